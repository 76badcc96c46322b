"""The one place where exceptions become gRPC status codes.

Handlers raise `ServiceError`s; anything else is a bug, logged with its traceback and reported as
INTERNAL (never UNKNOWN). Cancellation passes through untouched. A request that does not decode
(truncated bytes, invalid UTF-8 in a string field) never reaches a handler: grpc would answer
UNKNOWN and log a traceback, so the deserializer hands the handler wrapper a marker instead, which
answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import inspect
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


def undecodable_error(request: Undecodable) -> InvalidArgumentError:
    return InvalidArgumentError("request", f"is not a valid message: {request.reason}")


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
        codecs = {
            "request_deserializer": safe_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if not method.startswith("/goodspeed."):
            return guard_foreign(handler, method, codecs)  # health and reflection map their own errors
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary, method), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, method), **codecs)
        return handler


def wrap_unary(behavior: Callable[[Any, Context], Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise undecodable_error(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, method)

    return unary


def wrap_stream(behavior: Callable[[Any, Context], AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                raise undecodable_error(request)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, method)

    return stream


def guard_foreign(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, codecs: dict[str, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """Health's and reflection's handlers, unchanged but for undecodable requests. They come as
    coroutines or async generators (health's Watch writes with context.write), kept as they are."""

    async def refuse(request: Any, context: Context) -> None:
        if isinstance(request, Undecodable):
            await abort_with(undecodable_error(request), context, method)

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            await refuse(request, context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
        writer = handler.unary_stream

        async def write(request: Any, context: Context) -> None:
            await refuse(request, context)
            await writer(request, context)

        return grpc.unary_stream_rpc_method_handler(write, **codecs)
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        bidi = handler.stream_stream

        async def each_checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async def checked() -> AsyncIterator[Any]:
                async for request in requests:
                    await refuse(request, context)
                    yield request

            async for item in bidi(checked(), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(each_checked, **codecs)
    return handler
