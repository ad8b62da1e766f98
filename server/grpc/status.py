"""Typed errors to gRPC status codes, once, at the service boundary.

Every servicer method is wrapped by :func:`rpc`. An error of a type in :data:`STATUS_OF` reaches
the caller with its code and its own message (which names request fields, see
``logitcache.client.errors``). Anything else is a bug or a broken dependency: the caller gets
INTERNAL with a generic message and an error id, and the traceback is logged under that id,
so an operator can find it and nothing internal leaks to clients.

Requests are parsed by :func:`service_handler`'s deserializers, which never raise: a message
that does not decode (corrupt bytes, invalid UTF-8 in a string field) reaches the method as
:class:`Undecodable`, and the call ends INVALID_ARGUMENT with one log line, no traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from logitcache.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LogitCacheError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from logitcache.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

STATUS_OF: dict[type[LogitCacheError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


class UndecodableRequest(InvalidArgument):
    """A request message that is not a valid encoding of its type."""


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer hands over instead of a message it could not parse."""

    reason: str


def service_handler(servicer: object, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """Every method of ``service`` on ``servicer``, with deserializers that never raise (the
    generated ``add_..._to_server`` uses the messages' own ``FromString``, whose errors grpc
    logs with a traceback and answers as UNKNOWN)."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: kinds[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=_tolerant(GetMessageClass(m.input_type).FromString),
            response_serializer=GetMessageClass(m.output_type).SerializeToString,
        )
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(str(e))

    return deserialize


def _decoded(request: Any) -> Any:
    """The request, refused if it did not decode; a stream of requests checks each message."""
    if isinstance(request, Undecodable):
        raise UndecodableRequest(
            f"the request could not be decoded ({request.reason}); send a valid message"
        )
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def status_of(error: BaseException) -> grpc.StatusCode:
    """The code a caller sees for ``error``: its type's, or INTERNAL for anything unexpected."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, method: str, error: Exception) -> NoReturn:
    """End the call with ``error``'s status; an unexpected error is logged under a fresh id."""
    code = status_of(error)
    if code is grpc.StatusCode.INTERNAL:
        error_id = uuid.uuid4().hex[:12]
        log.error("%s failed with an unexpected error [error id %s]", method, error_id,
                  exc_info=error, extra={"error_id": error_id})  # fmt: skip
        await context.abort(
            code, f"internal error (error id {error_id}); the server's log has the details"
        )
    if isinstance(error, UndecodableRequest):
        log.warning("%s from %s: %s", method, context.peer(), error)
    await context.abort(code, str(error) or type(error).__name__)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


class HasMetrics(Protocol):
    """What :func:`rpc` needs from the servicer it wraps methods of."""

    metrics: ServerMetrics


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map errors to status codes and count every call by method and final code."""
    name = method.__name__

    def record(self: HasMetrics, code: grpc.StatusCode, started: float) -> None:
        self.metrics.record_request(name, code.name, time.perf_counter() - started)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: HasMetrics, request: Any,
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # fmt: skip
            started = time.perf_counter()
            try:
                async for item in method(self, _decoded(request), context):
                    yield item
            except Exception as e:
                record(self, status_of(e), started)
                await abort(context, name, e)
            record(self, grpc.StatusCode.OK, started)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: HasMetrics, request: Any,
                            context: grpc.aio.ServicerContext) -> Any:  # fmt: skip
        started = time.perf_counter()
        try:
            result = await method(self, _decoded(request), context)
        except Exception as e:
            record(self, status_of(e), started)
            await abort(context, name, e)
        record(self, grpc.StatusCode.OK, started)
        return result

    return unary_wrapper
