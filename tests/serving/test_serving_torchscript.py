"""The TorchScript backend served over gRPC (CPU): answers match torch.jit.load in-process and the ONNX server.
Run: .venv/bin/python -m pytest tests/serving/test_serving_torchscript.py -q"""

from __future__ import annotations


import grpc
import numpy as np
import pytest

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def ts_stub(model_repository, helpers):
    server = helpers.ServerProcess(model_repository, "--backend", "torchscript", "--device", "cpu").start()
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.DigitServiceStub(channel)
    server.stop_cleanly()


def test_torchscript_matches_in_process_and_onnx(ts_stub, stub, digits, model_repository, helpers):
    images, _ = digits
    logits, embedding = helpers.reference_outputs(model_repository, "torchscript", images)
    request = pb.ClassifyRequest(images=[pb.Image(pixels=x.tobytes()) for x in images], return_logits=True)
    served = ts_stub.Classify(request)
    assert served.model_name == "lsoftmax_mnist_torchscript"
    np.testing.assert_allclose([r.logits for r in served.results], logits, atol=1e-5)
    assert [r.label for r in served.results] == logits.argmax(1).tolist()
    via_onnx = stub.Classify(request)
    np.testing.assert_allclose([r.logits for r in served.results], [r.logits for r in via_onnx.results], atol=1e-4)
    embedded = ts_stub.Embed(pb.EmbedRequest(images=request.images))
    np.testing.assert_allclose([e.values for e in embedded.embeddings], embedding, atol=1e-5, rtol=1e-5)


def test_torchscript_model_info(ts_stub):
    info = ts_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.backend, info.device) == ("lsoftmax_mnist_torchscript", "torchscript", "cpu")
    assert list(info.onnx_providers) == []
