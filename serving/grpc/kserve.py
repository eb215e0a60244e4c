"""inference.GRPCInferenceService: the KServe v2 / Open Inference Protocol subset, answering as Triton does.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer over the
models the server loaded (by repository name). Thin like serving.grpc.typed: validate → runner (dynamic
batching) → response; errors are serving.core.errors types mapped to statuses by serving.grpc.interceptors.
Input `image` (the manifest's input name) UINT8 [N, 1, 28, 28] in raw_input_contents (read in place with
np.frombuffer) or typed uint_contents; outputs `logits` FP32 [N, C] and `embedding` FP32 [N, D] in
raw_output_contents, all of them or the requested subset, in the requested order (names and order:
serving.repository.format). N may exceed the batcher's max_batch_size (the request is split) but not
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
from serving.core.inference import InferenceCore
from serving.core.errors import InvalidInput
from serving.repository.model_config import effective_config
from serving.repository.format import OUTPUT_DATATYPE
from serving.backends.runner import ModelRunner

__all__ = ["KServeServicer", "SERVICE_NAME", "SERVER_NAME", "INFER_METHOD", "EXTENSIONS", "server_metadata",
           "runner_config"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"
SERVER_NAME = "lsoftmax-serve"
# binary_tensor_data: the HTTP transport's binary extension (gRPC's raw contents are the protocol's own)
EXTENSIONS = ("model_configuration", "binary_tensor_data")


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """A thin adapter: KServe protobuf ↔ serving.core.inference.InferenceCore."""

    def __init__(self, core: InferenceCore, configs: Mapping[str, mc.ModelConfig] | None = None) -> None:
        """configs: each model's config.pbtxt (the effective configuration adds how this server runs it)."""
        self.core = core
        self._configs = dict(configs or {})
        self._effective: dict[str, pb.ModelConfigResponse] = {}
        self._server_metadata = pb.ServerMetadataResponse(**server_metadata())
        self._templates: dict[tuple[str, tuple[str, ...], int], pb.ModelInferResponse] = {}  # see _template

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.server_ready())

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        metadata = self.core.model_metadata(self.core.runner(request.name, request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                        platform=metadata["platform"],
                                        inputs=[tensor(**t) for t in metadata["inputs"]],
                                        outputs=[tensor(**t) for t in metadata["outputs"]])

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        runner = self.core.runner(request.name, request.version)
        response = self._effective.get(runner.name)
        if response is None:
            response = self._effective[runner.name] = pb.ModelConfigResponse(
                config=runner_config(runner, self._configs.get(runner.name)))
        return response

    def _images(self, request: pb.ModelInferRequest) -> np.ndarray:
        inputs = request.inputs
        if len(inputs) != 1:
            got = ", ".join(repr(i.name) for i in inputs) or "none"
            raise InvalidInput(f"expected 1 input named '{self.core.input_name}', got {got}")
        tensor = inputs[0]
        raws = request.raw_input_contents
        if len(raws) > 1:
            raise InvalidInput(f"{len(raws)} raw_input_contents for 1 input")
        return self.core.tensor_images(request.model_name, tensor.name, tensor.datatype, tensor.shape,
                                       raw=raws[0] if raws else None,
                                       values=None if raws else tensor.contents.uint_contents)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        runner = self.core.inference_runner(request.model_name, request.model_version)
        images = self._images(request)
        names = tuple([output.name for output in request.outputs])
        wanted = self.core.wanted_outputs(runner, names)
        arrays = self.core.select_outputs(await runner.submit(images), wanted)  # no coroutine frames in between
        response = pb.ModelInferResponse()
        response.CopyFrom(self._template(runner, names, arrays))
        if request.id:
            response.id = request.id
        response.raw_output_contents.extend([array.tobytes() for _, array in arrays])
        return response

    def _template(self, runner: ModelRunner, names: tuple[str, ...], arrays) -> pb.ModelInferResponse:
        """The answer without its id and tensor contents, made once per model, requested outputs and batch size:
        copying it is a quarter of building it (names, datatypes, shapes) for every call."""
        key = (runner.name, names, len(arrays[0][1]))
        template = self._templates.get(key)
        if template is None:
            tensor = pb.ModelInferResponse.InferOutputTensor
            template = pb.ModelInferResponse(
                model_name=runner.name, model_version=runner.version,
                outputs=[tensor(name=name, datatype=OUTPUT_DATATYPE, shape=array.shape) for name, array in arrays])
            if len(self._templates) < 4096:  # models × output combinations × batch sizes; more are built each time
                self._templates[key] = template
        return template


def server_metadata() -> dict:
    """KServe server metadata, the same over both transports."""
    return {"name": SERVER_NAME, "version": _version(), "extensions": list(EXTENSIONS)}


def runner_config(runner: ModelRunner, base: mc.ModelConfig | None) -> mc.ModelConfig:
    """The model's configuration as this server runs it (config.pbtxt plus batching, device, platform)."""
    base = base or mc.ModelConfig(name=runner.name, backend=runner.entry.backend)
    return effective_config(base, runner.entry, runner.backend.device, runner.batcher.config)
