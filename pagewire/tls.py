"""TLS and mTLS material for every pagewire server and channel, from the ``--tls-*`` flags.

One certificate per service plays both roles: it is what the service presents when it serves,
and, under mTLS, the identity it presents when it dials a peer. The CA bundle is what peers'
certificates must chain to, in both directions. Files are read and checked once, at startup, so
a wrong path or a key that does not match its certificate stops the service before it listens,
instead of surfacing later as a handshake failure on some other machine.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pagewire.config import CommonConfig


class TLSConfigError(ValueError):
    """The ``--tls-*`` flags do not describe a usable TLS setup; the message names the flag."""


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files a service was configured with, and their contents as read at startup.

    ``cert``/``key`` are empty for a pure client (``pagewire generate --tls-ca ...``); ``ca`` is
    empty when peers' certificates chain to the system roots.
    """

    cert_file: str
    key_file: str
    ca_file: str
    client_auth: bool
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)  # never in a log line
    ca: bytes = field(repr=False)

    @classmethod
    def from_config(cls, cfg: CommonConfig) -> TLSFiles | None:
        """The TLS setup ``cfg`` asks for; ``None`` when it asks for plaintext."""
        return cls.load(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_client_auth)

    @classmethod
    def load(
        cls, cert_file: str, key_file: str, ca_file: str, client_auth: bool = False
    ) -> TLSFiles | None:
        if not (cert_file or key_file or ca_file):
            if client_auth:
                raise TLSConfigError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
            return None
        if bool(cert_file) != bool(key_file):
            raise TLSConfigError("--tls-cert and --tls-key must be given together")
        if client_auth and not (cert_file and ca_file):
            raise TLSConfigError(
                "--tls-client-auth needs --tls-cert/--tls-key to serve and --tls-ca to verify clients"
            )
        files = cls(
            cert_file=cert_file,
            key_file=key_file,
            ca_file=ca_file,
            client_auth=client_auth,
            cert=_read("--tls-cert", cert_file),
            key=_read("--tls-key", key_file),
            ca=_read("--tls-ca", ca_file),
        )
        files._check()
        return files

    def _check(self) -> None:
        """Parse what was read the way OpenSSL will, so mistakes fail here with the flag named."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.cert_file:
            try:
                # A passphrase-protected key gets an empty one and fails here: without it,
                # OpenSSL would prompt on the terminal and a service started by a supervisor
                # would hang. grpc cannot use such a key anyway.
                ctx.load_cert_chain(self.cert_file, self.key_file, password="")
            except ssl.SSLError as e:
                raise TLSConfigError(
                    f"--tls-cert {self.cert_file} / --tls-key {self.key_file}: not a PEM "
                    f"certificate and its matching private key ({e.reason or e.args[-1]})"
                ) from None
        if self.ca_file:
            try:
                ctx.load_verify_locations(cadata=self.ca.decode("ascii", "replace"))
            except ssl.SSLError:
                raise TLSConfigError(
                    f"--tls-ca {self.ca_file}: not a PEM CA bundle (no certificate in it)"
                ) from None

    @property
    def can_serve(self) -> bool:
        return bool(self.cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; with client auth, clients must chain to the CA."""
        if not self.can_serve:
            raise TLSConfigError("serving TLS needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca or None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for dialing a peer: verify it against the CA, present our own cert (mTLS).

        The cert is presented whenever there is one, not only under ``--tls-client-auth``: that
        flag says what *this* service demands of its clients, not what its peers demand.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca or None,
            private_key=self.key or None,
            certificate_chain=self.cert or None,
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same setup for an HTTP server (aiohttp ``TCPSite(ssl_context=...)``)."""
        if not self.can_serve:
            raise TLSConfigError("serving TLS needs --tls-cert and --tls-key")
        # A bare context, not create_default_context(): that one would also trust the system
        # roots for client certificates, letting in any publicly issued cert under mTLS.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.ca:
            ctx.load_verify_locations(cadata=self.ca.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED if self.client_auth else ssl.CERT_NONE
        return ctx


def _read(flag: str, path: str) -> bytes:
    if not path:
        return b""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{flag} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise TLSConfigError(f"{flag} {path}: file is empty")
    return data
