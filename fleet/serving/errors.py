"""Errors of the serving layer, each with the HTTP status and gRPC code the protocol gives it.

One table maps a kind of failure to both transports, so the REST and gRPC adapters cannot drift
apart: a request that is a 400 over HTTP is an INVALID_ARGUMENT over gRPC, always. The gRPC code is
kept as its name (``grpc.StatusCode[name]``) so this module stays free of transport imports.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    """(HTTP status, gRPC status code name, metric reason label)."""

    INVALID = (400, "INVALID_ARGUMENT", "invalid")
    UNAUTHENTICATED = (401, "UNAUTHENTICATED", "unauthenticated")
    NOT_FOUND = (404, "NOT_FOUND", "not_found")
    TOO_LARGE = (413, "RESOURCE_EXHAUSTED", "too_large")
    CANCELLED = (499, "CANCELLED", "cancelled")
    INTERNAL = (500, "INTERNAL", "internal")
    UNIMPLEMENTED = (501, "UNIMPLEMENTED", "unimplemented")
    UNAVAILABLE = (503, "UNAVAILABLE", "unavailable")
    TIMEOUT = (504, "DEADLINE_EXCEEDED", "timeout")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> str:
        return self.value[1]

    @property
    def reason(self) -> str:
        return self.value[2]


class ServingError(Exception):
    """A request the server refuses or cannot finish; ``str(e)`` is the message the client sees."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def message(self) -> str:
        return str(self)


def invalid(message: str) -> ServingError:
    return ServingError(ErrorKind.INVALID, message)


def not_found(message: str) -> ServingError:
    return ServingError(ErrorKind.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(ErrorKind.UNAVAILABLE, message)
