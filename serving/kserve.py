"""inference.GRPCInferenceService: the KServe v2 / Open Inference Protocol subset, answering as Triton does.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer over the models the server
loaded (by repository name). Thin like serving.servicer: validate → runner → response; errors are
serving.errors types mapped to statuses by serving.interceptors. Input `image` UINT8 [N, 1, 28, 28] in
raw_input_contents (or typed uint_contents); outputs `logits` FP32 [N, C] and `embedding` FP32 [N, D] in
raw_output_contents, all of them or the requested subset, in the requested order.
Triton's answers: an unknown model is ready=false on ModelReady and NOT_FOUND "Request for unknown model:
'<name>' is not found" on metadata/infer; a model still loading → UNAVAILABLE; bad shape, datatype or byte
count → INVALID_ARGUMENT.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

import numpy as np

from serving._proto.inference import grpc_service_pb2 as pb
from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving.errors import InvalidInput, LimitExceeded, NotFound, NotReady
from serving.repository import Manifest
from serving.runner import ModelRunner

__all__ = ["KServeServicer", "SERVICE_NAME", "SERVER_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "lsoftmax-serve"
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}  # Triton's platform names
INPUT_SHAPE = (1, 28, 28)


def _version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runners: Mapping[str, ModelRunner], served: list[str], manifest: Manifest,
                 max_images_per_request: int) -> None:
        """runners: loaded models by name, filled in as each becomes warm; served: every name this server
        loads (the server is ready when all of them are in `runners`)."""
        self._runners = runners
        self._served = list(served)
        self._manifest = manifest
        self._max_images = max_images_per_request
        self._server_metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=[])

    def _runner(self, name: str, version: str) -> ModelRunner:
        if name not in self._served:
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        runner = self._runners.get(name)
        if runner is None:
            raise NotReady(f"Request for model '{name}' which is not ready yet (loading)")
        if version not in ("", runner.version):
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
            name=runner.name, versions=[runner.version], platform=PLATFORMS[runner.entry.kind],
            inputs=[tensor(name=self._manifest.input_name, datatype="UINT8", shape=[-1, *INPUT_SHAPE])],
            outputs=[tensor(name="logits", datatype="FP32", shape=[-1, self._manifest.num_classes]),
                     tensor(name="embedding", datatype="FP32", shape=[-1, self._manifest.embedding_dim])],
        )

    def _images(self, request: pb.ModelInferRequest) -> np.ndarray:
        """Validate the one input and return it as uint8 [N, 1, 28, 28]."""
        name = self._manifest.input_name
        if len(request.inputs) != 1 or request.inputs[0].name != name:
            got = ", ".join(repr(i.name) for i in request.inputs) or "none"
            raise InvalidInput(f"expected 1 input named '{name}', got {got}")
        tensor = request.inputs[0]
        if tensor.datatype != "UINT8":
            raise InvalidInput(f"inference input '{name}' data-type is '{tensor.datatype}', but model "
                               f"'{request.model_name}' expects 'UINT8'")
        shape = tuple(tensor.shape)
        if len(shape) != 4 or shape[1:] != INPUT_SHAPE or shape[0] < 1:
            raise InvalidInput(f"unexpected shape for input '{name}' for model '{request.model_name}'. "
                               f"Expected [-1,1,28,28], got {list(shape)}")
        if shape[0] > self._max_images:
            raise LimitExceeded(f"batch of {shape[0]} images; this server accepts at most {self._max_images} "
                                "per request (--max-images-per-request)")
        expected = shape[0] * 784
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
            raw = request.raw_input_contents[0]
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

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        runner = self._runner(request.model_name, request.model_version)
        images = self._images(request)
        wanted = [o.name for o in request.outputs] or ["logits", "embedding"]
        unknown = [n for n in wanted if n not in ("logits", "embedding")]
        if unknown:
            raise InvalidInput(f"unexpected inference output '{unknown[0]}' for model '{runner.name}'")
        logits, embedding = await runner.infer(images)
        arrays = {"logits": logits, "embedding": embedding}
        response = pb.ModelInferResponse(model_name=runner.name, model_version=runner.version, id=request.id)
        for name in wanted:
            array = np.ascontiguousarray(arrays[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response
