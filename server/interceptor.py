"""The one place where exceptions become gRPC status codes.

Handlers raise `ServiceError`s; anything else is a bug, logged with its traceback and reported as
INTERNAL (never UNKNOWN). Cancellation passes through untouched. A request that does not decode
(truncated bytes, invalid UTF-8 in a string field) never reaches a handler: grpc would answer
UNKNOWN and log a traceback, so the deserializer hands the handler wrapper a marker instead, which
answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from server.errors import (
    DeadlineExceededError,
    EngineFailedError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
)

log = structlog.get_logger("goodspeed.rpc")

STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    EngineFailedError: grpc.StatusCode.INTERNAL,
}

Context = Any  # grpc.aio.ServicerContext; grpc ships no type information


async def abort_with(exc: Exception, context: Context, method: str) -> None:
    if isinstance(exc, ServiceError):
        code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
        log.info("request refused", method=method, code=code.name, error=str(exc))
        await context.abort(code, str(exc))
    log.exception("unexpected error", method=method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message that could not be decoded."""

    reason: str


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "malformed protobuf")

    return decode


def check_decoded(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgumentError("request", f"is not a valid message: {request.reason}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        # Health and reflection report their own errors; theirs are wrapped for undecodable requests only.
        is_ours = method.startswith("/goodspeed.")
        codecs = {
            "request_deserializer": safe_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary, method, is_ours), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, method, is_ours), **codecs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(wrap_bidi(handler.stream_stream, method), **codecs)
        return handler


def wrap_unary(
    behavior: Callable[[Any, Context], Awaitable[Any]], method: str, is_ours: bool
) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        try:
            check_decoded(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if not is_ours and not isinstance(exc, ServiceError):
                raise
            await abort_with(exc, context, method)

    return unary


def wrap_stream(
    behavior: Callable[[Any, Context], AsyncIterator[Any]], method: str, is_ours: bool
) -> Callable[..., Any]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            check_decoded(request)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if not is_ours and not isinstance(exc, ServiceError):
                raise
            await abort_with(exc, context, method)

    return stream


def wrap_bidi(behavior: Callable[[Any, Context], AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    """Reflection's stream: each incoming message is checked as it is read."""

    async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await abort_with(
                        InvalidArgumentError("request", f"is not a valid message: {request.reason}"), context, method
                    )
                yield request

        async for item in behavior(checked(), context):
            yield item

    return stream
