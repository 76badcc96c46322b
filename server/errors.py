"""Errors the control plane raises; the interceptor maps each to one gRPC status code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client may see, with the message it will read."""


class InvalidArgumentError(ServiceError):
    """A request field is wrong whatever the server's state (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhaustedError(ServiceError):
    """The waiting queue or the KV budget is full (RESOURCE_EXHAUSTED)."""


class UnavailableError(ServiceError):
    """Draining, or the engine is restarting; the client may retry (UNAVAILABLE)."""


class DeadlineExceededError(ServiceError):
    """The client's deadline passed before the request finished (DEADLINE_EXCEEDED)."""


class UnauthenticatedError(ServiceError):
    """A missing or wrong admin token (UNAUTHENTICATED)."""


class EngineFailedError(ServiceError):
    """The engine could not run the request (INTERNAL)."""
