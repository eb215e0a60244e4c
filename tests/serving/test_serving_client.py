"""The client library (serving.client): image conversion, retries on UNAVAILABLE within the deadline, and
classify / embed / info / batched arrays against the session's ONNX server.
Run: .venv/bin/python -m pytest tests/serving/test_serving_client.py -q"""

from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest

from serving.client import Client, image_messages, ordered_map, preprocess


class _Unavailable(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "fake"


def test_image_messages_accepts_paths_bytes_and_arrays(tmp_path, digits, helpers):
    images, _ = digits
    path = tmp_path / "d.png"
    path.write_bytes(helpers.png_bytes(images[0]))
    messages = image_messages([str(path), path, helpers.png_bytes(images[1]), images[2], images[3].reshape(784)])
    assert [m.WhichOneof("data") for m in messages] == ["encoded"] * 3 + ["pixels"] * 2
    assert messages[3].pixels == images[2].tobytes()
    assert len(image_messages(images)) == len(images)  # a batch array
    assert len(image_messages(images.reshape(-1, 1, 28, 28))) == len(images)
    with pytest.raises(ValueError, match="uint8"):
        image_messages(images.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        image_messages(np.zeros((5, 27, 27), np.uint8))
    with pytest.raises(TypeError):
        image_messages([3.14])


def test_retries_unavailable_with_backoff_then_succeeds():
    client = Client("127.0.0.1:1", initial_backoff=0.01, max_backoff=0.02)
    calls = []

    def flaky(request, timeout, metadata=None):
        calls.append(timeout)
        if len(calls) < 3:
            raise _Unavailable()
        return "answer"

    assert client._call(flaky, None, timeout=5) == "answer"
    assert len(calls) == 3 and all(0 < t <= 5 for t in calls) and calls[0] > calls[-1]


def test_other_errors_are_not_retried():
    client = Client("127.0.0.1:1", initial_backoff=0.01)
    calls = []

    def invalid(request, timeout, metadata=None):
        calls.append(1)
        raise _Unavailable(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        client._call(invalid, None, timeout=5)
    assert len(calls) == 1


def test_gives_up_within_the_deadline_when_nobody_listens(digits):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    # The bound is the feature (the call's own 1 s deadline), checked with room for a slow, shared machine: 30
    # retries that ignored the deadline would back off for at least ~25 s (0.05 s doubling to the 2 s cap, jittered
    # down to half at most), so the slack cannot hide one.
    with Client(f"127.0.0.1:{port}", timeout=1.0, retries=30, initial_backoff=0.05) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.classify(digits[0][:1])
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - start < 1.0 + 10.0


def test_classify_embed_info_against_the_server(onnx_server, digits, model_repository, helpers):
    images, _ = digits
    logits, embedding = helpers.reference_outputs(model_repository, "onnx", images)
    with Client(onnx_server.address, timeout=10) as client:
        client.wait_until_serving(timeout=30)
        results = client.classify(images[:5], top_k=2, return_logits=True)
        assert [r.label for r in results] == logits[:5].argmax(1).tolist()
        assert all(len(r.top_k) == 2 and r.top_k[0][0] == r.label for r in results)
        np.testing.assert_allclose(np.stack([r.logits for r in results]), logits[:5], atol=1e-5)
        vectors = client.embed(images[:5])
        assert vectors.shape == (5, 128) and vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, embedding[:5], atol=1e-5, rtol=1e-5)
        info = client.info()
        assert info["backend"] == "onnxruntime" and info["manifest"]["net"] == "fast"
        labels, probabilities = client.classify_array(images, batch_size=7, concurrency=3)
        assert labels.tolist() == logits.argmax(1).tolist() and probabilities.shape == (len(images),)
        seen = []
        all_vectors = client.embed_array(images, batch_size=5, concurrency=2, progress=seen.append)
        np.testing.assert_allclose(all_vectors, embedding, atol=1e-5, rtol=1e-5)
        assert sum(seen) == len(images)


def test_ordered_map_keeps_order_and_bounds_pending():
    def slow_square(x):
        time.sleep(0.01 * (x % 3))
        return x * x

    assert list(ordered_map(slow_square, range(20), concurrency=4)) == [x * x for x in range(20)]
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda x: 1 // (x - 5), range(10), concurrency=2))


def test_calls_are_spread_over_every_address_of_the_target(onnx_server, model_repository, helpers, digits):
    """round_robin: `ipv4:A,B` (what a headless Service's DNS name resolves to) reaches both replicas."""
    second = helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu").start()
    try:
        ports = [server.address.rsplit(":", 1)[1] for server in (onnx_server, second)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        before = [sum(r.get("event") == "rpc" and r["method"].endswith("/Classify") for r in s.records)
                  for s in (onnx_server, second)]
        with Client(target, timeout=10) as client:
            client.wait_until_serving()
            for _ in range(20):
                assert client.classify(digits[0][:1])[0].label in range(10)

        def served() -> list[int]:
            after = [sum(r.get("event") == "rpc" and r["method"].endswith("/Classify") for r in s.records)
                     for s in (onnx_server, second)]
            return [a - b for a, b in zip(after, before)]

        # Each call's log line is written before its answer, but read from the servers' stderr on threads here.
        helpers.wait_until(lambda: sum(served()) >= 20, what="the 20 calls' log lines")
        assert sum(served()) == 20 and min(served()) >= 5, served()
    finally:
        second.stop_cleanly()


def test_preprocess_is_the_typed_apis_pipeline_for_kserve_users(onnx_server, tmp_path):
    """What a tritonclient user feeds `image` after preprocess() is what Classify's return_inputs shows."""
    from PIL import Image, ImageDraw

    page = Image.new("L", (400, 300), 240)
    ImageDraw.Draw(page).ellipse([(150, 60), (250, 240)], outline=20, width=16)  # a dark "0" on paper
    path = tmp_path / "zero.png"
    page.save(path)
    batch = preprocess(path)
    assert batch.shape == (1, 28, 28) and batch.dtype == np.uint8 and batch.max() > 200
    with Client(onnx_server.address, timeout=10) as client:
        served = client.classify([path], return_inputs=True)[0].model_input
    np.testing.assert_array_equal(batch[0], served)
    np.testing.assert_array_equal(preprocess(path.read_bytes(), invert="never"), preprocess(path, invert="never"))
    with pytest.raises(ValueError):
        preprocess(path, fit="stretch")
