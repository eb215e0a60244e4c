"""grpc.health.v1 Health with graceful shutdown that ends Watch streams.

grpc_health's asyncio servicer keeps every Watch stream open forever, so a server with a watching load
balancer would always spend its whole shutdown grace period waiting for them. Here a Watch stream sends
NOT_SERVING and then completes (status OK) once shutdown begins; Check keeps answering while the server
still accepts calls. Statuses start NOT_SERVING for "" and every listed service.
"""

from __future__ import annotations

from typing import Iterable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["HealthServicer", "SERVING", "NOT_SERVING"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_aio.HealthServicer):
    def __init__(self, services: Iterable[str]) -> None:
        super().__init__()
        self.services = ("", *services)
        self._watching: dict[str, int] = {}
        for service in self.services:
            self._server_status[service] = NOT_SERVING

    async def set_all(self, status) -> None:
        for service in self.services:
            await self.set(service, status)

    async def Watch(self, request, context) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] = self._watching.get(service, 0) + 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            # Drop the condition only with its last watcher (the base class drops it with the first to leave,
            # stranding the others), so watching arbitrary names cannot grow the table.
            self._watching[service] -= 1
            if not self._watching[service]:
                del self._watching[service]
                self._server_watchers.pop(service, None)
