"""The one place where exceptions become gRPC status codes.

Handlers raise `ServiceError`s; anything else is a bug, logged with its traceback and reported as
INTERNAL (never UNKNOWN). Cancellation passes through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or not method.startswith("/goodspeed."):
            return handler  # health and reflection handle their own errors
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def wrap_unary(behavior: Callable[[Any, Context], Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, method)

    return unary


def wrap_stream(behavior: Callable[[Any, Context], AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, method)

    return stream
