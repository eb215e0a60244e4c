"""inference.GRPCInferenceService: the KServe v2 / Open Inference Protocol subset, answering as Triton does.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer over the
models the server loaded (by repository name). Thin like serving.servicer: validate → runner (dynamic
batching) → response; errors are serving.errors types mapped to statuses by serving.interceptors.
Input `image` (the manifest's input name) UINT8 [N, 1, 28, 28] in raw_input_contents (read in place with
np.frombuffer) or typed uint_contents; outputs `logits` FP32 [N, C] and `embedding` FP32 [N, D] in
raw_output_contents, all of them or the requested subset, in the requested order (names and order:
serving.repository_format). N may exceed the batcher's max_batch_size (the request is split) but not
--max-images-per-request (RESOURCE_EXHAUSTED).
Triton's answers: an unknown model is ready=false on ModelReady and NOT_FOUND "Request for unknown model:
'<name>' is not found" on metadata/config/infer; a model still loading (server not ready) → UNAVAILABLE;
a full queue → UNAVAILABLE "Exceeds maximum queue size"; bad shape, datatype or byte count → INVALID_ARGUMENT.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

import numpy as np

from serving._proto.inference import grpc_service_pb2 as pb
from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving._proto.inference import model_config_pb2 as mc
from serving.errors import InvalidInput, LimitExceeded, NotFound, NotReady
from serving.metrics import charge
from serving.model_config import effective_config
from serving.repository import Manifest, ModelEntry
from serving.repository_format import ALL_OUTPUTS, IMAGE_DIMS, INPUT_DATATYPE, OUTPUT_DATATYPE, OUTPUTS
from serving.runner import ModelRunner

__all__ = ["KServeServicer", "SERVICE_NAME", "SERVER_NAME", "INFER_METHOD"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"
SERVER_NAME = "lsoftmax-serve"
PIXELS = IMAGE_DIMS[-2] * IMAGE_DIMS[-1]


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runners: Mapping[str, ModelRunner], served: list[ModelEntry], manifest: Manifest,
                 max_images_per_request: int, configs: Mapping[str, mc.ModelConfig] | None = None) -> None:
        """runners: loaded models by name, filled in as each becomes warm; served: every model this server
        loads (the server is ready when all of them are in `runners`); configs: each model's config.pbtxt."""
        self._runners = runners
        self._served = {e.name: e for e in served}
        self._manifest = manifest
        self._max_images = max_images_per_request
        self._configs = dict(configs or {})
        self._effective: dict[str, pb.ModelConfigResponse] = {}
        self._server_metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=_version(),
                                                          extensions=["model_configuration"])
        self._input = manifest.input_name

    def _runner(self, name: str, version: str) -> ModelRunner:
        if name not in self._served:
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        runner = self._runners.get(name)
        if runner is None:
            raise NotReady(f"Request for model '{name}' which is not ready yet (loading)")
        if version and version != runner.version:
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found")
        return runner

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=all(name in self._runners for name in self._served))

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        runner = self._runners.get(request.name)
        return pb.ModelReadyResponse(ready=runner is not None and request.version in ("", runner.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        runner = self._runner(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=runner.name, versions=[runner.version], platform=runner.entry.format.platform,
            inputs=[tensor(name=self._input, datatype=INPUT_DATATYPE, shape=[-1, *IMAGE_DIMS])],
            outputs=[tensor(name=name, datatype=OUTPUT_DATATYPE, shape=[-1, size]) for name, size in
                     zip(OUTPUTS, (self._manifest.num_classes, self._manifest.embedding_dim))]
            + ([tensor(name=ALL_OUTPUTS[2], datatype=OUTPUT_DATATYPE, shape=[-1])] if runner.backend.has_known_score
               else []),
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        runner = self._runner(request.name, request.version)
        response = self._effective.get(runner.name)
        if response is None:
            base = self._configs.get(runner.name) or mc.ModelConfig(name=runner.name, backend=runner.entry.backend)
            config = effective_config(base, runner.entry, runner.backend.device, runner.batcher.config)
            response = self._effective[runner.name] = pb.ModelConfigResponse(config=config)
        return response

    def _images(self, request: pb.ModelInferRequest) -> np.ndarray:
        """Validate the one input and return it as uint8 [N, 1, 28, 28] (a view of the request's bytes)."""
        name = self._input
        inputs = request.inputs
        if len(inputs) != 1 or inputs[0].name != name:
            got = ", ".join(repr(i.name) for i in inputs) or "none"
            raise InvalidInput(f"expected 1 input named '{name}', got {got}")
        tensor = inputs[0]
        if tensor.datatype != INPUT_DATATYPE:
            raise InvalidInput(f"inference input '{name}' data-type is '{tensor.datatype}', but model "
                               f"'{request.model_name}' expects '{INPUT_DATATYPE}'")
        shape = tuple(tensor.shape)
        if len(shape) != 1 + len(IMAGE_DIMS) or shape[1:] != IMAGE_DIMS or shape[0] < 1:
            raise InvalidInput(f"unexpected shape for input '{name}' for model '{request.model_name}'. "
                               f"Expected [{','.join(map(str, (-1, *IMAGE_DIMS)))}], got {list(shape)}")
        n = shape[0]
        if n > self._max_images:
            raise LimitExceeded(f"batch of {n} images; this server accepts at most {self._max_images} "
                                "per request (--max-images-per-request)")
        expected = n * PIXELS
        raws = request.raw_input_contents
        if raws:
            if len(raws) != 1:
                raise InvalidInput(f"{len(raws)} raw_input_contents for 1 input")
            raw = raws[0]
            if len(raw) != expected:
                raise InvalidInput(f"input '{name}' shape {list(shape)} UINT8 needs {expected} bytes, "
                                   f"raw_input_contents has {len(raw)}")
            return np.frombuffer(raw, np.uint8).reshape(shape)
        values = tensor.contents.uint_contents
        if len(values) != expected:
            raise InvalidInput(f"input '{name}' shape {list(shape)} needs {expected} values in raw_input_contents "
                               f"or contents.uint_contents, got {len(values)}")
        array = np.asarray(values, np.uint32)
        if array.max(initial=0) > 255:
            raise InvalidInput(f"input '{name}' UINT8 values must be 0..255")
        return array.astype(np.uint8).reshape(shape)

    @staticmethod
    def _wanted(request: pb.ModelInferRequest, model: str, names: tuple[str, ...] = OUTPUTS) -> tuple[int, ...]:
        """Indices into the model's outputs (`names`: OUTPUTS, then known_score when the graph has it) of the
        requested outputs, in the requested order (all when none are named)."""
        if not request.outputs:
            return tuple(range(len(names)))
        wanted = []
        for output in request.outputs:
            if output.name not in names:
                raise InvalidInput(f"unexpected inference output '{output.name}' for model '{model}'")
            wanted.append(names.index(output.name))
        return tuple(wanted)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        runner = self._runner(request.model_name, request.model_version)
        charge(runner.stats)
        images = self._images(request)
        names = ALL_OUTPUTS if runner.backend.has_known_score else OUTPUTS
        wanted = self._wanted(request, runner.name, names)
        arrays = await runner.infer(images)
        tensor = pb.ModelInferResponse.InferOutputTensor
        outputs, contents = [], []
        for index in wanted:
            array = arrays[index]
            outputs.append(tensor(name=names[index], datatype=OUTPUT_DATATYPE, shape=array.shape))
            contents.append(array.astype("<f4", copy=False).tobytes())
        return pb.ModelInferResponse(model_name=runner.name, model_version=runner.version, id=request.id,
                                     outputs=outputs, raw_output_contents=contents)
