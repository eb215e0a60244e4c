"""GPU serving (marker `cuda`; skipped without a GPU): the TorchScript model served on CUDA answers as the CPU
graph does (also under concurrent, batched load), and the ONNX server on --device auto reports the execution
provider it really uses.
Run: .venv/bin/python -m pytest tests/serving/test_serving_cuda.py -q -m cuda"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")


def _serve_and_classify(model_repository, helpers, images, *args):
    server = helpers.ServerProcess(model_repository, *args).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            raw = [pb.Image(pixels=x.tobytes()) for x in images]
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            logits = np.array([r.logits for r in stub.Classify(pb.ClassifyRequest(images=raw, return_logits=True)).results])
            embedding = np.array([e.values for e in stub.Embed(pb.EmbedRequest(images=raw)).embeddings])
        assert server.stop() == 0
        return info, logits, embedding
    finally:
        server.kill()


def _agree(logits, embedding, ref_logits, ref_embedding):
    # cuDNN may use TF32 convolutions: close, not bitwise equal.
    np.testing.assert_allclose(logits, ref_logits, atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(embedding, ref_embedding, atol=5e-3, rtol=5e-3)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    assert (logits.argmax(1) == ref_logits.argmax(1))[clear].all()


def test_torchscript_on_cuda_matches_cpu(model_repository, helpers, digits):
    images, _ = digits
    info, logits, embedding = _serve_and_classify(model_repository, helpers, images, "--backend", "torchscript",
                                                  "--device", "cuda")
    assert (info.backend, info.device) == ("torchscript", "cuda:0")
    _agree(logits, embedding, *helpers.reference_outputs(model_repository, "torchscript", images))


def test_onnx_on_auto_reports_the_provider_it_uses(model_repository, helpers, digits):
    import onnxruntime as ort

    images, _ = digits
    info, logits, embedding = _serve_and_classify(model_repository, helpers, images, "--backend", "onnx",
                                                  "--device", "auto")
    providers = list(info.onnx_providers)
    assert providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers[0] == "CUDAExecutionProvider" and info.device == "cuda:0", providers
    else:
        assert info.device == "cpu"
    _agree(logits, embedding, *helpers.reference_outputs(model_repository, "onnx", images))


def test_batching_on_cuda_answers_concurrent_clients_as_alone(model_repository, helpers, digits, gates):
    """One model copy on the GPU; concurrent batch-1 clients are coalesced and still get their own answers."""
    model = "lsoftmax_mnist_torchscript"
    server = gates.server(model_repository, "--backend", "torchscript", "--device", "cuda",
                          "--log-level", "info", "--max-queue-delay-us", "200").start()
    try:
        result = helpers.loadgen("run", "--address", server.address, "--api", "kserve", "--model",
                                 model, "--concurrency", "32", "--processes", "2",
                                 "--requests", "2000", "--distinct", "8", "--check", "--tolerance", "5e-3")
        assert result["errors"] == {} and result["wrong"] == 0
        samples = helpers.scrape(server)
        requests = helpers.metric(samples, "nv_inference_request_success", model=model)
        assert requests == 2000 + 2 * 8
        executions = helpers.metric(samples, "nv_inference_exec_count", model=model)
        assert executions <= requests  # how many batches formed under load depends on the machine's speed
        # Coalesced for certain: one call held on the GPU, 15 queued behind it go as one batch.
        images = digits[0][:16]
        since = len(server.records)
        with grpc.insecure_channel(server.address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            calls = [pb.ClassifyRequest(images=[pb.Image(pixels=x.tobytes())], return_logits=True) for x in images]
            with gates.holding("infer"):
                first = classify.future(calls[0], timeout=60)
                gates.wait_held(server, "infer", since=since)
                rest = [classify.future(call, timeout=60) for call in calls[1:]]
                helpers.wait_until(lambda: helpers.pending(server, model) == 15, what="15 calls queued")
            logits = np.array([f.result().results[0].logits for f in [first, *rest]])
        ref_logits, _ = helpers.reference_outputs(model_repository, "torchscript", images)
        np.testing.assert_allclose(logits, ref_logits, atol=5e-3, rtol=5e-3)
        after = helpers.scrape(server)
        assert helpers.metric(after, "nv_inference_exec_count", model=model) == executions + 2
        assert helpers.metric(after, "nv_inference_request_success", model=model) == requests + 16
    finally:
        gates.release()
        assert server.stop() == 0
