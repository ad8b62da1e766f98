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
from logitcache.server.policy.access import Action
from logitcache.server.policy.gate import Call, PolicyGate

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


class Guarded(Protocol):
    """What :func:`rpc` needs from the servicer it wraps methods of."""

    metrics: ServerMetrics
    gate: PolicyGate


def rpc(needs: Action | Callable[..., Any]) -> Any:
    """Wrap a servicer method: admit its caller through the servicer's policy gate, map errors
    to status codes once, count the call by method and final code, and write its audit line.

    ``@rpc(Action.READ)`` (or PRODUCE, ADMINISTER) says what role the method needs, and the
    method takes the admitted :class:`Call` after the context:
    ``async def M(self, request, context, call)``; it checks access lists and charges quotas
    through ``self.gate`` with that call. Bare ``@rpc`` is admin-only and the method takes no
    call: a method added without a policy decision is closed to everyone but admins.
    """
    if isinstance(needs, Action):
        return functools.partial(_guarded, needs=needs, passes_call=True)
    return _guarded(needs, needs=Action.ADMINISTER, passes_call=False)


def _guarded(method: Callable[..., Any], *, needs: Action, passes_call: bool) -> Callable[..., Any]:
    name = method.__name__

    def finish(self: Guarded, call: Call, code: grpc.StatusCode, started: float) -> None:
        self.metrics.record_request(name, code.name, time.perf_counter() - started)
        self.gate.record(call, code.name)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Guarded, request: Any,
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # fmt: skip
            started = time.perf_counter()
            call, code = Call(name), grpc.StatusCode.CANCELLED  # until it ends otherwise
            try:
                await self.gate.admit(call, context.invocation_metadata(), needs)
                async for item in method(self, _decoded(request), context,
                                         *((call,) if passes_call else ())):  # fmt: skip
                    yield item
                code = grpc.StatusCode.OK
            except Exception as e:
                code = status_of(e)
                await abort(context, name, e)
            finally:
                finish(self, call, code, started)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Guarded, request: Any,
                            context: grpc.aio.ServicerContext) -> Any:  # fmt: skip
        started = time.perf_counter()
        call, code = Call(name), grpc.StatusCode.CANCELLED
        try:
            await self.gate.admit(call, context.invocation_metadata(), needs)
            result = await method(self, _decoded(request), context,
                                  *((call,) if passes_call else ()))  # fmt: skip
            code = grpc.StatusCode.OK
            return result
        except Exception as e:
            code = status_of(e)
            await abort(context, name, e)
        finally:
            finish(self, call, code, started)

    return unary_wrapper
