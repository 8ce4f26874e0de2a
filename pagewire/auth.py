"""The public API's optional bearer token (``--api-key``), for gRPC and HTTP alike.

Every method needs ``authorization: Bearer <key>`` except those of the services in
:data:`OPEN_SERVICES` (health and reflection), so load balancers and Kubernetes probes, which
carry no secrets, still see the router. Denying by default means a method added to the public
service later is covered without anyone remembering to list it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
METADATA_KEY = "authorization"  # gRPC metadata keys are lowercase on the wire
SCHEME = "bearer"  # compared case-insensitively, as RFC 7235 says of auth schemes
DENIED = "missing or invalid bearer token: send 'authorization: Bearer <api key>'"


def _digest(text: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the key's length.
    return hashlib.sha256(text.encode()).digest()


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``api_key``; always true without a key.

    The HTTP server calls this with the raw header; the gRPC interceptor with the metadata value.
    """
    if not api_key:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != SCHEME:
        return False
    return hmac.compare_digest(_digest(token.strip()), _digest(api_key))


def bearer_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata a client sends to authenticate (empty without a key)."""
    return ((METADATA_KEY, f"Bearer {api_key}"),) if api_key else ()


async def _deny(_requests: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


# Streaming both ways, whatever the method's real shape: on the wire every gRPC call is a stream,
# and this shape lets the refusal go out without reading, let alone parsing, one request message.
_REFUSAL = grpc.stream_stream_rpc_method_handler(_deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED every call outside :data:`OPEN_SERVICES` without the key."""

    def __init__(self, api_key: str, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        if not api_key:
            raise ValueError("an empty api key would let everyone in; install no interceptor")
        self.api_key = api_key
        self.open_services = open_services

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        service = details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in self.open_services:
            return handler  # None: an unknown method, answered UNIMPLEMENTED
        header = next((v for k, v in details.invocation_metadata or () if k == METADATA_KEY), None)
        ok = isinstance(header, str) and authorized(header, self.api_key)
        return handler if ok else _REFUSAL


def interceptors(api_key: str) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """What the public server installs: the token check when a key is configured, else none."""
    return (BearerTokenInterceptor(api_key),) if api_key else ()
