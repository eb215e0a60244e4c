"""The RPC boundary: every unary call passes through here for exception → status mapping and its log line.

Servicers raise serving.errors types (or anything else, a bug); this interceptor turns them into the
status `serving.errors.status_for` names, logs unexpected ones with their traceback, and writes one
structured debug line per request (method, status, images, milliseconds, peer). Streaming calls (health
Watch, reflection) pass through untouched. Wrapped handlers are cached per method, so the per-call cost
is one dict lookup. Later concerns of the same kind (auth tokens, request metrics) belong here too.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from serving.errors import status_for
from serving.logs import log_event

__all__ = ["BoundaryInterceptor"]

logger = logging.getLogger("serving.rpc")


def _count_images(request) -> int | None:
    """Images in a lsoftmax.v1 request (`images`) or a KServe ModelInfer (batch axis of the first input)."""
    images = getattr(request, "images", None)
    if images is not None:
        return len(images)
    inputs = getattr(request, "inputs", None)
    return int(inputs[0].shape[0]) if inputs and len(inputs[0].shape) else None


class BoundaryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._cache[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(method: str, behavior):
        async def call(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancellation (client went away, shutdown)
                    code = grpc.StatusCode.CANCELLED
                    raise
                code, details = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    logger.exception("unhandled exception in %s", method, extra={"fields": {"method": method}})
                await context.abort(code, details)
            finally:
                if logger.isEnabledFor(logging.DEBUG):
                    log_event(logger, logging.DEBUG, "rpc", method=method, code=code.name,
                              images=_count_images(request), ms=round((time.perf_counter() - start) * 1e3, 3),
                              peer=context.peer())

        return call
