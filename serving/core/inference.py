"""The protocol-neutral inference core: what every transport (gRPC, HTTP) asks of the server, in plain Python
and numpy types (no protobuf, no status codes).

    core = InferenceCore(runners, typed_model, served, manifest, limits, decoder)
    result = await core.classify(items, top_k=3, invert=0, fit=0, deadline=None)   # items: [(kind, bytes)]
    embedded = await core.embed(items, l2_normalize=True)
    runner = core.runner("lsoftmax_mnist_onnx", "")       # KServe: NotFound / NotReady as Triton words them
    images = core.tensor_images(model, "image", "UINT8", shape, raw=..., values=...)
    outputs = await core.infer_tensors(runner, images, wanted=["logits"])

It owns model lookup (unknown → NotFound, loading → NotReady), the per-request limits, the one decision between
raw pixels and encoded images (and their options), the batcher (through each model's runner), and temperature and
threshold postprocessing (each model's own: serving.repository.calibration). Errors are serving.core.errors types;
each transport maps them to its own statuses (serving/grpc/status.py, serving/http/errors.py). Calls are charged to
their model's metrics (serving.metrics.charge) here, where the model becomes known; the transports' boundary records
the outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from serving.core import postprocess
from serving.images.lanes import Decoder
from serving.core.errors import InvalidInput, LimitExceeded, NotFound, NotReady
from serving.images.decoding import DEFAULT_MAX_IMAGE_PIXELS, PIXELS, Invert, all_raw, decode_batch, options
from serving.metrics import charge
from serving.repository.reader import Manifest, ModelEntry
from serving.repository.format import ALL_OUTPUTS, IMAGE_DIMS, INPUT_DATATYPE, OUTPUT_DATATYPE, OUTPUTS
from serving.backends.runner import ModelRunner

__all__ = ["InferenceCore", "Limits", "Classified", "Embedded", "ImageItem"]

ImageItem = tuple  # (kind, data): kind "encoded" or "pixels" (None: the image set neither), data bytes


@dataclass(frozen=True)
class Limits:
    max_images_per_request: int = 256
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = 4 * DEFAULT_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class Classified:
    """A classify answer for N images: the top-k labels and calibrated probabilities, the raw logits, the
    open-set answer and the model's input."""
    labels: np.ndarray  # int [N, k], most probable first
    probabilities: np.ndarray  # float32 [N, k]
    logits: np.ndarray  # float32 [N, C]
    known_score: np.ndarray | None  # float32 [N]; None for graphs exported without it
    rejected: np.ndarray  # bool [N]: known_score below the served model's threshold
    inputs: np.ndarray  # uint8 [N, 1, 28, 28], what the model saw
    model_name: str
    model_version: str


@dataclass(frozen=True)
class Embedded:
    embedding: np.ndarray  # float32 [N, D]
    model_name: str
    model_version: str


class InferenceCore:
    def __init__(self, runners: Mapping[str, ModelRunner], typed_model: str, served: Sequence[ModelEntry],
                 manifest: Manifest, limits: Limits, decoder: Decoder) -> None:
        """runners: the loaded models by name, filled in as each is loaded and warm; typed_model: the model the
        typed API serves; served: every model this server loads (ready when all of them are in `runners`)."""
        self.runners = runners
        self.typed_model = typed_model
        self.served = {entry.name: entry for entry in served}
        self.manifest = manifest
        self.limits = limits
        self.decoder = decoder
        self.input_name = manifest.input_name
        self._image_dims = list(IMAGE_DIMS)
        self._wanted: dict[tuple[str, tuple[str, ...]], list[tuple[str, int]]] = {}  # wanted_outputs' answers
        self.draining = False  # set on SIGTERM: not ready any more (transports refuse new inference calls)

    # ------------------------------------------------------------------ models

    def typed_runner(self) -> ModelRunner:
        runner = self.runners.get(self.typed_model)
        if runner is None:
            raise NotReady(f"model {self.typed_model!r} is not loaded yet; retry shortly")
        return runner

    def runner(self, name: str, version: str = "") -> ModelRunner:
        """A served model by repository name (and version, when given), as Triton answers for it."""
        if name not in self.served:
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        runner = self.runners.get(name)
        if runner is None:
            raise NotReady(f"Request for model '{name}' which is not ready yet (loading)")
        if version and version != runner.version:
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found")
        return runner

    def inference_runner(self, name: str, version: str = "") -> ModelRunner:
        """runner() for an inference call: the call is charged to the model's metrics from here on, whatever
        becomes of it (a bad input after this counts as that model's failure, as in Triton)."""
        runner = self.runner(name, version)
        charge(runner.stats)
        return runner

    def server_ready(self) -> bool:
        return not self.draining and all(name in self.runners for name in self.served)

    def model_ready(self, name: str, version: str = "") -> bool:
        runner = self.runners.get(name)
        return not self.draining and runner is not None and version in ("", runner.version)

    def output_names(self, runner: ModelRunner) -> tuple[str, ...]:
        """The model's outputs in order: logits, embedding, then known_score when the graph has it."""
        return ALL_OUTPUTS if runner.backend.has_known_score else OUTPUTS

    def model_metadata(self, runner: ModelRunner) -> dict:
        """KServe model metadata (the same for both transports)."""
        sizes = {OUTPUTS[0]: [-1, self.manifest.num_classes], OUTPUTS[1]: [-1, self.manifest.embedding_dim]}
        return {
            "name": runner.name, "versions": [runner.version], "platform": runner.entry.format.platform,
            "inputs": [{"name": self.input_name, "datatype": INPUT_DATATYPE, "shape": [-1, *IMAGE_DIMS]}],
            "outputs": [{"name": name, "datatype": OUTPUT_DATATYPE, "shape": sizes.get(name, [-1])}
                        for name in self.output_names(runner)],
        }

    def model_info(self) -> dict:
        """The typed API's GetModelInfo fields."""
        runner = self.typed_runner()
        manifest, entry, backend, batching = runner.manifest, runner.entry, runner.backend, runner.batcher.config
        calibration = runner.calibration
        return dict(
            model_name=entry.name, model_version=entry.version, net=manifest.net, margin=manifest.margin,
            num_classes=manifest.num_classes, embedding_dim=manifest.embedding_dim,
            test_accuracy=manifest.test_accuracy, model_sha256=entry.sha256, backend=backend.kind,
            device=backend.device, onnx_providers=list(backend.providers),
            max_images_per_request=self.limits.max_images_per_request,
            max_message_bytes=self.limits.max_message_bytes, manifest_raw=manifest.raw,
            dynamic_batching=batching.enabled, max_batch_size=batching.max_batch_size,
            max_queue_delay_us=batching.max_queue_delay_us, max_queue_size=batching.max_queue_size,
            temperature=calibration.temperature,
            known_score_detector=calibration.detector if backend.has_known_score else "",
            known_score_threshold=calibration.threshold if backend.has_known_score else None,
            precision=entry.precision, calibrated_precision=calibration.precision,
        )

    # ------------------------------------------------------------------ the typed API

    async def images(self, items: Sequence[ImageItem], invert: int = 0, fit: int = 0,
                     deadline: float | None = None) -> np.ndarray:
        """The one entry point for request images: [(kind, data)] → uint8 [N, 1, 28, 28]. Raw pixels are reshaped
        inline (microseconds); anything encoded goes to the decoder's lanes (off the event loop, deadline checked
        between images). deadline: a time.monotonic() value or None."""
        if len(items) > self.limits.max_images_per_request:
            raise LimitExceeded(f"{len(items)} images in one request; this server accepts at most "
                                f"{self.limits.max_images_per_request} (--max-images-per-request)")
        if not items:
            raise InvalidInput("the request has no images")
        invert_mode, fit_mode = options(invert, fit)
        if invert_mode != Invert.ALWAYS and all_raw(items):
            return decode_batch(items, invert_mode, fit_mode)
        return await self.decoder.decode(items, invert_mode, fit_mode, deadline)

    async def classify(self, items: Sequence[ImageItem], top_k: int = 1, invert: int = 0, fit: int = 0,
                       deadline: float | None = None) -> Classified:
        runner = self.typed_runner()
        charge(runner.stats)
        num_classes = runner.manifest.num_classes
        k = top_k or 1
        if not 1 <= k <= num_classes:
            raise InvalidInput(f"top_k must be between 1 and {num_classes}, got {top_k}")
        batch = await self.images(items, invert, fit, deadline)
        outputs = await runner.infer(batch)
        logits = outputs[0]
        known = outputs[2] if len(outputs) > 2 else None  # graphs exported before the open-set score have none
        threshold = runner.calibration.threshold if known is not None else None  # the served model's own fit
        probabilities = postprocess.softmax(logits / np.float32(runner.calibration.temperature))
        labels, scores = postprocess.top_k(probabilities, k)
        rejected = known < threshold if threshold is not None else np.zeros(len(batch), bool)
        return Classified(labels=labels, probabilities=scores, logits=logits, known_score=known, rejected=rejected,
                          inputs=batch, model_name=runner.name, model_version=runner.version)

    async def embed(self, items: Sequence[ImageItem], l2_normalize: bool = False, invert: int = 0, fit: int = 0,
                    deadline: float | None = None) -> Embedded:
        runner = self.typed_runner()
        charge(runner.stats)
        batch = await self.images(items, invert, fit, deadline)
        embedding = (await runner.infer(batch))[1]
        if l2_normalize:
            embedding = postprocess.l2_normalize(embedding)
        return Embedded(embedding=embedding, model_name=runner.name, model_version=runner.version)

    # ------------------------------------------------------------------ KServe v2 tensors

    def tensor_images(self, model: str, name: str, datatype: str, shape: Sequence[int], raw: bytes | None = None,
                      values: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Check the one input tensor as Triton words its refusals and return uint8 [N, 1, 28, 28] (a view of `raw`
        when given; else from `values`, a flat sequence of 0..255)."""
        if raw is not None and name == self.input_name and datatype == INPUT_DATATYPE and len(shape) == 4:
            n, *dims = shape  # the usual request, checked in one go; anything else takes the worded checks below
            if dims == self._image_dims and 0 < n <= self.limits.max_images_per_request and len(raw) == n * PIXELS:
                return np.frombuffer(raw, np.uint8).reshape(n, *IMAGE_DIMS)
        if name != self.input_name:
            raise InvalidInput(f"expected 1 input named '{self.input_name}', got '{name}'")
        if datatype != INPUT_DATATYPE:
            raise InvalidInput(f"inference input '{name}' data-type is '{datatype}', but model '{model}' expects "
                               f"'{INPUT_DATATYPE}'")
        shape = tuple(int(d) for d in shape)
        if len(shape) != 1 + len(IMAGE_DIMS) or shape[1:] != IMAGE_DIMS or shape[0] < 1:
            raise InvalidInput(f"unexpected shape for input '{name}' for model '{model}'. "
                               f"Expected [{','.join(map(str, (-1, *IMAGE_DIMS)))}], got {list(shape)}")
        n = shape[0]
        if n > self.limits.max_images_per_request:
            raise LimitExceeded(f"batch of {n} images; this server accepts at most "
                                f"{self.limits.max_images_per_request} per request (--max-images-per-request)")
        expected = n * PIXELS
        if raw is not None:
            if len(raw) != expected:
                raise InvalidInput(f"input '{name}' shape {list(shape)} UINT8 needs {expected} bytes, got {len(raw)}")
            return np.frombuffer(raw, np.uint8).reshape(shape)
        array = np.asarray(values if values is not None else (), dtype=np.int64).reshape(-1)
        if array.size != expected:
            raise InvalidInput(f"input '{name}' shape {list(shape)} needs {expected} values, got {array.size}")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidInput(f"input '{name}' UINT8 values must be 0..255")
        return array.astype(np.uint8).reshape(shape)

    def wanted_outputs(self, runner: ModelRunner, names: Sequence[str]) -> list[tuple[str, int]]:
        """(name, index into the model's outputs) of the requested outputs, in the requested order (all when none
        are named); InvalidInput naming an unknown one."""
        key = (runner.name, tuple(names))
        wanted = self._wanted.get(key)
        if wanted is not None:
            return wanted
        available = self.output_names(runner)
        if not names:
            wanted = list(zip(available, range(len(available))))
        else:
            wanted = []
            for name in names:
                if name not in available:
                    raise InvalidInput(f"unexpected inference output '{name}' for model '{runner.name}'")
                wanted.append((name, available.index(name)))
        if len(self._wanted) < 1024:  # valid requests name a handful of combinations; a flood of others is not kept
            self._wanted[key] = wanted
        return wanted

    async def infer_tensors(self, runner: ModelRunner, images: np.ndarray,
                            wanted: Sequence[tuple[str, int]]) -> list[tuple[str, np.ndarray]]:
        """The requested outputs (float32, little-endian) of one KServe inference, batched with concurrent calls."""
        return self.select_outputs(await runner.submit(images), wanted)

    @staticmethod
    def select_outputs(arrays: Sequence[np.ndarray], wanted: Sequence[tuple[str, int]]) -> list[tuple[str, np.ndarray]]:
        """The wanted outputs of a backend call, as (name, C-contiguous little-endian float32 array)."""
        return [(name, np.ascontiguousarray(arrays[index], dtype="<f4")) for name, index in wanted]


def deadline_after(seconds: float | None) -> float | None:
    """A time.monotonic() deadline `seconds` from now (None: none)."""
    return None if seconds is None else time.monotonic() + seconds
