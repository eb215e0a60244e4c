"""lsoftmax.v1.DigitService: Classify, Embed, GetModelInfo. Thin: validate → runner (dynamic batching) → response.

Errors are raised as serving.errors types and mapped to status codes by serving.interceptors; the
servicer never touches status codes itself. Encoded images are decoded off the event loop by
serving.decode_queue (its two lanes, deadline and bounds); all-raw batches are reshaped inline (microseconds). A request may
hold more images than the batcher's max_batch_size (it is split) but not more than --max-images-per-request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from serving import postprocess
from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.errors import InvalidInput, LimitExceeded, NotReady
from serving.decode_queue import Decoder
from serving.images import DEFAULT_MAX_IMAGE_PIXELS, Invert, all_raw, decode_batch, options
from serving.metrics import charge
from serving.runner import ModelRunner

__all__ = ["DigitServicer", "Limits", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitService"].full_name


@dataclass(frozen=True)
class Limits:
    max_images_per_request: int = 256
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = 4 * DEFAULT_MAX_IMAGE_PIXELS


class DigitServicer(pb_grpc.DigitServiceServicer):
    def __init__(self, runners: Mapping[str, ModelRunner], model_name: str, limits: Limits,
                 decoder: Decoder) -> None:
        """runners: the server's loaded models by name, filled in as each is loaded and warm (shared with
        the KServe servicer); model_name: the one this API serves."""
        self.limits = limits
        self.model_name = model_name
        self._runners = runners
        self._decoder = decoder

    def _ready(self) -> ModelRunner:
        runner = self._runners.get(self.model_name)
        if runner is None:
            raise NotReady(f"model {self.model_name!r} is not loaded yet; retry shortly")
        return runner

    async def _images(self, images, image_options: pb.ImageOptions, context) -> np.ndarray:
        if len(images) > self.limits.max_images_per_request:
            raise LimitExceeded(f"{len(images)} images in one request; this server accepts at most "
                                f"{self.limits.max_images_per_request} (--max-images-per-request)")
        items = [(image.WhichOneof("data"), image.encoded or image.pixels) for image in images]
        if not items:
            raise InvalidInput("the request has no images")
        invert, fit = options(image_options.invert, image_options.fit)
        if invert != Invert.ALWAYS and all_raw(items):
            return decode_batch(items, invert, fit)  # raw pixels: a reshape, microseconds
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self._decoder.decode(items, invert, fit, deadline)

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        runner = self._ready()
        charge(runner.stats)
        num_classes = runner.manifest.num_classes
        k = request.top_k or 1
        if k > num_classes:
            raise InvalidInput(f"top_k must be between 1 and {num_classes}, got {request.top_k}")
        batch = await self._images(request.images, request.options, context)
        outputs = await runner.infer(batch)
        logits = outputs[0]
        known = outputs[2] if len(outputs) > 2 else None  # graphs exported before issue 13 have no known_score
        threshold = runner.manifest.known_score_threshold if known is not None else None
        probabilities = postprocess.softmax(logits / np.float32(runner.manifest.temperature))
        labels, scores = postprocess.top_k(probabilities, k)
        results = []
        for i in range(len(batch)):
            top = [pb.ClassScore(label=int(label), probability=float(p)) for label, p in zip(labels[i], scores[i])]
            results.append(pb.Classification(label=top[0].label, probability=top[0].probability, top_k=top,
                                             logits=logits[i].tolist() if request.return_logits else (),
                                             model_input=batch[i].tobytes() if request.return_inputs else b"",
                                             known_score=float(known[i]) if known is not None else 0.0,
                                             rejected=threshold is not None and bool(known[i] < threshold)))
        return pb.ClassifyResponse(results=results, model_name=runner.name, model_version=runner.version)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        runner = self._ready()
        charge(runner.stats)
        batch = await self._images(request.images, request.options, context)
        embedding = (await runner.infer(batch))[1]
        if request.l2_normalize:
            embedding = postprocess.l2_normalize(embedding)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in embedding.tolist()],
                                dim=embedding.shape[1], model_name=runner.name, model_version=runner.version)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        runner = self._ready()
        manifest, entry, backend, batching = runner.manifest, runner.entry, runner.backend, runner.batcher.config
        return pb.GetModelInfoResponse(
            model_name=entry.name, model_version=entry.version, net=manifest.net, margin=manifest.margin,
            num_classes=manifest.num_classes, embedding_dim=manifest.embedding_dim,
            test_accuracy=manifest.test_accuracy, model_sha256=entry.sha256, backend=backend.kind,
            device=backend.device, onnx_providers=list(backend.providers),
            max_images_per_request=self.limits.max_images_per_request,
            max_message_bytes=self.limits.max_message_bytes, manifest_json=json.dumps(manifest.raw, sort_keys=True),
            dynamic_batching=batching.enabled, max_batch_size=batching.max_batch_size,
            max_queue_delay_us=batching.max_queue_delay_us, max_queue_size=batching.max_queue_size,
            temperature=manifest.temperature,
            known_score_detector=manifest.known_score_detector if backend.has_known_score else "",
            known_score_threshold=manifest.known_score_threshold if backend.has_known_score else None,
        )
