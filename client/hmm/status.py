"""The one place where KernelErrors become gRPC statuses (daemon and device services).

Every servicer method is wrapped by ``rpc_method`` (``rpc_stream`` for a
server-streaming one): a KernelError ends the call with the status code derived
from its errno and the errno's name and number in trailing metadata (`hmm-errno`,
`hmm-errno-value`); any other exception is a bug, logged with its traceback and
reported as INTERNAL/EIO — the daemon keeps serving. A unary operation is
shielded from cancellation: a client that goes away mid-call does not leave a
system call half done. What the operation hands out that only its reply would
name (a migration) it may take back if the caller left (``if_caller_leaves``).

A request that does not parse never reaches a servicer: ``refuse_malformed``
handlers end the call with INVALID_ARGUMENT/EINVAL (grpc itself would answer
UNKNOWN, without an errno, and log a traceback for each such call).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from hmm.abi import ERRNO_METADATA_KEY, ERRNO_VALUE_METADATA_KEY
from hmm.errors import KernelError, errno_name

log = logging.getLogger(__name__)

_CODES = {
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EBADF: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ESRCH: grpc.StatusCode.NOT_FOUND,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.EBUSY: grpc.StatusCode.ABORTED,
    errno.EAGAIN: grpc.StatusCode.ABORTED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EOVERFLOW: grpc.StatusCode.OUT_OF_RANGE,
    errno.EFBIG: grpc.StatusCode.OUT_OF_RANGE,
    errno.ETIMEDOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    errno.ENODEV: grpc.StatusCode.UNAVAILABLE,
    errno.EIO: grpc.StatusCode.INTERNAL,
}


def status_code(err: int) -> grpc.StatusCode:
    return _CODES.get(err, grpc.StatusCode.FAILED_PRECONDITION)


async def abort(context: grpc.aio.ServicerContext, err: int, message: str) -> NoReturn:
    context.set_trailing_metadata(((ERRNO_METADATA_KEY, errno_name(err)), (ERRNO_VALUE_METADATA_KEY, str(err))))
    await context.abort(status_code(err), f"{errno_name(err)}: {message}")
    raise AssertionError("context.abort returned")  # (it raises AbortError)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
S = TypeVar("S", bound=Callable[..., AsyncGenerator[Any, None]])


class _Call:
    """One call being served: whether its caller left before the reply."""

    def __init__(self) -> None:
        self.left = False
        self.on_leave: list[Callable[[], None]] = []

    def leave(self) -> None:
        self.left = True
        for fn in self.on_leave:
            try:
                fn()
            except Exception:
                log.exception("cleanup after a caller left failed")
        self.on_leave.clear()


_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("hmm_rpc_call", default=None)


def if_caller_leaves(fn: Callable[[], None]) -> None:
    """In an ``rpc_method`` operation: run ``fn`` if the caller leaves before it
    has the reply (at once if it has left already). Register it last, just before
    returning the reply it concerns: grpc's ServicerContext does not tell (its
    ``cancelled()`` stays False when the client cancels)."""
    call = _current_call.get()
    if call is None:
        return
    if call.left:
        fn()
    else:
        call.on_leave.append(fn)


def rpc_method(fn: F) -> F:
    """Translate KernelError (and unexpected exceptions) into statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call()
        token = _current_call.set(call)
        try:
            task = asyncio.ensure_future(fn(self, request, context))  # (sees ``call``)
        finally:
            _current_call.reset(token)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            call.leave()
            task.add_done_callback(_consume)  # the caller left; the operation still completes
            raise
        except grpc.aio.AbortError:  # the method ended the call itself
            raise
        except Exception as e:
            await _fail(context, e, fn.__name__)

    return wrapper  # type: ignore[return-value]


def rpc_stream(fn: S) -> S:
    """``rpc_method`` for a server-streaming method (an async generator): an error
    ends the stream with the status and errno a unary call would get; the replies
    sent before it stand. Not shielded: a caller that leaves ends the stream."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(fn(self, request, context)) as replies:
                async for reply in replies:
                    yield reply
        except grpc.aio.AbortError:  # the method ended the call itself
            raise
        except Exception as e:
            await _fail(context, e, fn.__name__)

    return wrapper  # type: ignore[return-value]


async def _fail(context: grpc.aio.ServicerContext, e: Exception, name: str) -> None:
    """End the call for ``e``, raised by the servicer method ``name`` (from an except block)."""
    if isinstance(e, KernelError):
        await abort(context, e.errno or errno.EIO, e.strerror or "")
    elif isinstance(e, ValueError | OverflowError):
        await abort(context, errno.EINVAL, str(e))
    else:  # a bug: report it, keep serving
        log.exception("internal error in %s", name)
        await abort(context, errno.EIO, f"internal error: {e!r}")


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, KernelError):
            log.error("operation failed after its caller left: %r", exc)


Handlers = dict[str, grpc.RpcMethodHandler]


class _Registration:
    """Stands in for the server to catch the generated code's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: Handlers = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Handlers) -> None:
        self.service, self.handlers = service, handlers


def add_service(add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server,
                adapt: Callable[[Handlers], Handlers] | None = None) -> None:
    """The generated ``add_<Service>Servicer_to_server``, its handlers refusing a
    request that does not parse (EINVAL) and changed by ``adapt`` first."""
    caught = _Registration()
    add_to_server(servicer, caught)
    handlers = refuse_malformed(adapt(caught.handlers) if adapt else caught.handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(caught.service, handlers),))
    server.add_registered_method_handlers(caught.service, handlers)


class Malformed:
    """A request message that did not parse (``refuse_malformed``'s deserializers
    return it instead of raising): a stream's servicer meets it among the messages."""

    def __init__(self, error: DecodeError) -> None:
        self.error = str(error)


def refuse_malformed(handlers: Handlers) -> Handlers:
    """A service's method handlers that end a call whose request does not parse with
    EINVAL before the servicer sees it. A request stream yields a Malformed for each
    such message instead: its servicer decides (grpc cannot end one call of a stream)."""
    return {name: _refusing(h) for name, h in handlers.items()}


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(buf: bytes) -> Any:
        try:
            return parse(buf)
        except DecodeError as e:
            return Malformed(e)

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, request: Malformed) -> None:
    await abort(context, errno.EINVAL, f"malformed request: {request.error}")


def _refusing(h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    h = h._replace(request_deserializer=_tolerant(h.request_deserializer))  # type: ignore[attr-defined]
    if h.unary_unary is not None:
        behaviour = h.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                return await _refuse(context, request)
            return await behaviour(request, context)

        return h._replace(unary_unary=unary_unary)  # type: ignore[attr-defined,no-any-return]
    if h.unary_stream is not None:
        stream = h.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(context, request)
                return
            async for reply in stream(request, context):
                yield reply

        return h._replace(unary_stream=unary_stream)  # type: ignore[attr-defined,no-any-return]
    return h
