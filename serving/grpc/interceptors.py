"""The RPC boundary: authentication, draining, exception → status mapping, request metrics, the per-request log.

Every call passes through BoundaryInterceptor:
1. With a token configured (serving.security.TokenAuth), a call without `authorization: Bearer <token>`
   gets UNAUTHENTICATED before any handler runs; health checks stay open.
2. Unary calls run inside a wrapper that turns serving.core.errors types (or anything else, a bug) into the status
   `serving.grpc.status.status_for` names, logs unexpected ones with their traceback, records the outcome and
   duration on the counters of the model the servicer charged the call to (serving.metrics.charge: only
   inference calls on a loaded model are charged), and writes one structured debug line per request (method,
   status, images, milliseconds, peer).
3. The wrapper also counts calls in flight, until their status is sent, for graceful shutdown (Drain): once
   the server starts draining, new calls (health checks excepted) get UNAVAILABLE "shutting down" at once,
   which clients retry elsewhere, instead of being cancelled by gRPC's shutdown while they wait to be picked up.
Streaming calls (health Watch, reflection) pass through untouched after step 1. Wrapped handlers are cached
per method, so the per-call cost is a dict lookup, a clock read and a few integer additions.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from serving.core.boundary import Drain, record
from serving.core.errors import Unauthenticated
from serving.grpc.status import status_for
from serving.logs import log_event
from serving.metrics import charged
from serving.security import TokenAuth

__all__ = ["BoundaryInterceptor", "Drain"]

logger = logging.getLogger("serving.rpc")


def _count_images(request) -> int | None:
    """Images in a lsoftmax.v1 request (`images`) or a KServe ModelInfer (batch axis of the first input)."""
    images = getattr(request, "images", None)
    if images is not None:
        return len(images)
    inputs = getattr(request, "inputs", None)
    return int(inputs[0].shape[0]) if inputs and len(inputs[0].shape) else None


def _handler_factory(handler: grpc.RpcMethodHandler):
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler
    return grpc.stream_stream_rpc_method_handler


class BoundaryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth | None = None, drain: Drain | None = None) -> None:
        self._auth = auth
        self.drain = drain or Drain()
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._denied: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if self._auth is not None and not self._auth.public(method) \
                and not self._auth.check(handler_call_details.invocation_metadata):
            return self._deny(method, handler)
        if handler.unary_unary is None:
            return handler
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary, self.drain),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._cache[method] = (handler, wrapped)
        return wrapped

    def _deny(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        denied = self._denied.get(method)
        if denied is None:
            code, details = status_for(Unauthenticated(
                "missing or invalid credentials: send the metadata `authorization: Bearer <token>`"))

            async def deny(request_or_iterator, context):
                if logger.isEnabledFor(logging.DEBUG):
                    log_event(logger, logging.DEBUG, "rpc", method=method, code=code.name, peer=context.peer())
                await context.abort(code, details)

            denied = _handler_factory(handler)(deny, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)
            self._denied[method] = denied
        return denied

    @staticmethod
    def _wrap(method: str, behavior, drain: Drain):
        refusable = not TokenAuth.public(method)
        is_coroutine = inspect.iscoroutinefunction(behavior)  # every servicer method here: no per-call check

        async def call(request, context):
            if drain.draining and refusable:  # an answer, not an arrival: the drain does not wait for it
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the server is shutting down; retry (another replica) later")
            start = drain.arrived()
            context.add_done_callback(drain.answered)
            code = grpc.StatusCode.OK
            error: BaseException | None = None
            try:
                if is_coroutine:
                    return await behavior(request, context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:
                error = exc
                if not isinstance(exc, Exception):  # cancellation (client went away, shutdown)
                    code = grpc.StatusCode.CANCELLED
                    raise
                code, details = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    logger.exception("unhandled exception in %s", method, extra={"fields": {"method": method}})
            finally:  # accounted before the answer leaves, so a client that got it sees it in the metrics
                elapsed = time.perf_counter_ns() - start
                # on the model the core charged this call to (inference calls only)
                record(charged(), code == grpc.StatusCode.OK, error, elapsed,
                       cancelled=code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED))
                if logger.isEnabledFor(logging.DEBUG):
                    log_event(logger, logging.DEBUG, "rpc", method=method, code=code.name,
                              images=_count_images(request), ms=round(elapsed / 1e6, 3), peer=context.peer())
            # `error` → its traceback → this frame → `error` is a reference cycle, and the traceback's frames hold
            # the request and everything its handling opened: left to the cyclic GC, a flood of refused requests
            # kept hundreds of MiB alive. Drop both before abort raises.
            error = request = None
            await context.abort(code, details)

        return call
