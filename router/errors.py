"""The router's one error type, shared by the gRPC and the HTTP front.

Everything on the request path raises :class:`RequestError`; each front turns it into its own
status (a gRPC status code, or an HTTP status with OpenAI's JSON error body). The message always
starts with the offending field's name, because a client in another language only sees the text.
"""

from __future__ import annotations

import grpc

from pagewire.sampling import ValidationError

# OpenAI's HTTP statuses for the gRPC codes the router answers with.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RequestError(Exception):
    """A request the router refuses or cannot complete. ``str()`` is ``"<field>: <why>"``."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.reason = message

    def renamed(self, field: str) -> RequestError:
        """The same error blamed on ``field`` (e.g. which of several inputs)."""
        return RequestError(self.code, field, self.reason)

    @classmethod
    def invalid(cls, field: str, message: str) -> RequestError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, field, message)

    @classmethod
    def from_validation(cls, error: ValidationError) -> RequestError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, error.field, error.reason)

    @classmethod
    def from_code(cls, code: int, message: str) -> RequestError:
        """From a scheduler's TokenEvent error (a numeric google.rpc.Code and its text)."""
        status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            return cls(status, field, rest)
        return cls(status, "", message)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)
