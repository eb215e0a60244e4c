"""The model runner: one loaded model, its dynamic batcher and its metrics, as the servicers see it.

    runner = ModelRunner(backend, entry, manifest, BatchingConfig(...))
    logits, embedding = await runner.infer(uint8_batch)   # queued, batched, computed in the worker thread

Backend calls go through serving.backends.batching.DynamicBatcher: one worker thread per model (a CPU backend already
uses every core for one call, and a GPU backend works on one stream), so a slow call never blocks other
RPCs, health checks or shutdown, and concurrent requests share backend calls. `stats` holds the model's
Prometheus counters (serving.metrics).
"""

from __future__ import annotations

from typing import Awaitable

import numpy as np

from serving.backends import Backend
from serving.backends.batching import BatchingConfig, DynamicBatcher
from serving.metrics import ModelStats
from serving.repository.reader import Manifest, ModelEntry

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, backend: Backend, entry: ModelEntry, manifest: Manifest,
                 batching: BatchingConfig = BatchingConfig(), stats: ModelStats | None = None) -> None:
        self.backend = backend
        self.entry = entry
        self.manifest = manifest
        # The temperature and threshold this model's answers use: its own graph's (serving.repository.calibration).
        self.calibration = manifest.calibration(entry.name)
        self.stats = stats or ModelStats(entry.name, entry.version)
        self.batcher = DynamicBatcher(backend.infer, batching, self.stats, name=entry.kind)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [N, 1, 28, 28] → (logits [N, C], embedding [N, D]), computed in a batch off the event loop."""
        return await self.batcher.submit(images)

    def submit(self, images: np.ndarray) -> Awaitable[tuple[np.ndarray, ...]]:
        """infer() as an awaitable made now, without a coroutine frame of its own (the KServe hot paths)."""
        return self.batcher.submit(images)

    def close(self) -> None:
        """Fail what is still queued, wait for the running batch, then release the model."""
        self.batcher.close()
        self.backend.close()
