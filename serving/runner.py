"""The model runner: the one object that calls a backend, always off the event loop.

    runner = ModelRunner(backend, entry, manifest)
    logits, embedding = await runner.infer(uint8_batch)   # awaits a worker thread; the loop stays free

Backend calls run in a small dedicated thread pool (one worker by default: a CPU backend already uses
every core for one call, and a GPU backend works on one stream), so a slow call never blocks other RPCs,
health checks or shutdown. This is the seam where dynamic batching (queue + coalescing) plugs in.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.backends import Backend
from serving.repository import Manifest, ModelEntry

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, backend: Backend, entry: ModelEntry, manifest: Manifest, workers: int = 1) -> None:
        self.backend = backend
        self.entry = entry
        self.manifest = manifest
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{entry.kind}")

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 1, 28, 28] → (logits [N, C], embedding [N, D]) computed in the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.backend.infer, images)

    def close(self) -> None:
        """Wait for the running call, then release the model."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.backend.close()
