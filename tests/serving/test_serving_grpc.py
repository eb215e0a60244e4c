"""The ONNX server over gRPC (subprocess, free port): answers match the graph run in-process, health and
reflection, every bad input → INVALID_ARGUMENT naming the image (and the server keeps serving), limits →
RESOURCE_EXHAUSTED, one debug log line per request. Run: .venv/bin/python -m pytest tests/serving/test_serving_grpc.py -q"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving.images.decoding import decode_image

SERVICE = "lsoftmax.v1.DigitService"


def _raw(images) -> list:
    return [pb.Image(pixels=image.tobytes()) for image in images]


def _classify_labels(stub, images) -> list[int]:
    return [r.label for r in stub.Classify(pb.ClassifyRequest(images=_raw(images))).results]


def test_classify_raw_and_png_match_the_in_process_graph(stub, digits, model_repository, helpers):
    images, _ = digits
    logits, _ = helpers.reference_outputs(model_repository, "onnx", images)
    probabilities = helpers.softmax(logits)
    for request_images in (_raw(images), [pb.Image(encoded=helpers.png_bytes(x)) for x in images]):
        response = stub.Classify(pb.ClassifyRequest(images=request_images, top_k=3, return_logits=True))
        assert response.model_name == "lsoftmax_mnist_onnx" and response.model_version == "1"
        assert len(response.results) == len(images)
        got = np.array([r.logits for r in response.results])
        np.testing.assert_allclose(got, logits, atol=1e-5)
        assert [r.label for r in response.results] == logits.argmax(1).tolist()
        np.testing.assert_allclose([r.probability for r in response.results], probabilities.max(1), atol=1e-6)
        for r, p in zip(response.results, probabilities):
            assert [s.label for s in r.top_k] == np.argsort(-p, kind="stable")[:3].tolist()
            assert r.top_k[0].label == r.label and r.top_k[0].probability == r.probability


def test_large_encoded_image_is_fitted_as_in_process(stub, model_repository, helpers):
    canvas = Image.new("RGB", (300, 220), "white")
    ImageDraw.Draw(canvas).ellipse([(100, 30), (200, 190)], outline="black", width=16)  # a dark "0" on paper
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG")
    fitted = decode_image(0, buffer.getvalue())
    logits, _ = helpers.reference_outputs(model_repository, "onnx", fitted[None])
    response = stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=buffer.getvalue())], return_logits=True))
    np.testing.assert_allclose(response.results[0].logits, logits[0], atol=1e-5)


def test_return_inputs_shows_what_the_model_was_fed(stub, digits):
    """A photo-like capture and a raw array: model_input is the preprocessing's result, as in-process."""
    page = Image.new("RGB", (320, 240), (235, 230, 220))
    ImageDraw.Draw(page).line([(120, 60), (200, 60), (150, 190)], fill=(30, 30, 40), width=14)  # a dark "7"
    buffer = io.BytesIO()
    page.save(buffer, "JPEG", quality=80)
    images = [pb.Image(encoded=buffer.getvalue()), pb.Image(pixels=digits[0][0].tobytes())]
    response = stub.Classify(pb.ClassifyRequest(images=images, return_inputs=True))
    seen = [np.frombuffer(r.model_input, np.uint8).reshape(28, 28) for r in response.results]
    np.testing.assert_array_equal(seen[0], decode_image(0, buffer.getvalue()))
    np.testing.assert_array_equal(seen[1], digits[0][0])
    assert not any(r.model_input for r in stub.Classify(pb.ClassifyRequest(images=images)).results)  # opt-in


def test_classify_defaults_and_top_k_bounds(stub, digits):
    response = stub.Classify(pb.ClassifyRequest(images=_raw(digits[0][:2])))
    assert all(len(r.top_k) == 1 and len(r.logits) == 0 for r in response.results)
    assert len(stub.Classify(pb.ClassifyRequest(images=_raw(digits[0][:1]), top_k=10)).results[0].top_k) == 10
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(images=_raw(digits[0][:1]), top_k=11))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in info.value.details()


def test_embed_matches_the_in_process_graph(stub, digits, model_repository, helpers):
    images, _ = digits
    _, embedding = helpers.reference_outputs(model_repository, "onnx", images)
    response = stub.Embed(pb.EmbedRequest(images=_raw(images)))
    assert response.dim == 128 and len(response.embeddings) == len(images)
    got = np.array([e.values for e in response.embeddings], np.float32)
    np.testing.assert_allclose(got, embedding, atol=1e-5, rtol=1e-5)
    normalised = stub.Embed(pb.EmbedRequest(images=_raw(images), l2_normalize=True))
    unit = np.array([e.values for e in normalised.embeddings])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, embedding / np.linalg.norm(embedding, axis=1, keepdims=True), atol=1e-5)


def test_model_info(stub, model_repository):
    manifest = json.loads((model_repository / "manifest.json").read_text())
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.model_version, info.backend, info.device) == (
        "lsoftmax_mnist_onnx", "1", "onnxruntime", "cpu")
    assert list(info.onnx_providers) == ["CPUExecutionProvider"]
    assert info.model_sha256 == manifest["models"]["lsoftmax_mnist_onnx"]["sha256"]
    assert (info.net, info.margin, info.num_classes, info.embedding_dim) == ("fast", 2, 10, 128)
    assert info.HasField("test_accuracy") and info.test_accuracy == manifest["test_accuracy"]
    assert (info.max_images_per_request, info.max_message_bytes) == (64, 2 * 1024 * 1024)
    assert json.loads(info.manifest_json) == manifest


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(database.get_services())
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {"Classify", "Embed", "GetModelInfo"}


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[:300]


BAD_IMAGES = {
    "empty": (pb.Image(encoded=b""), "empty image"),
    "corrupt": (pb.Image(encoded=b"\x89PNG not really"), "not an image"),
    "truncated": (pb.Image(encoded=_truncated_png()), "truncated"),
    "huge-header": (pb.Image(encoded=_png_header(50_000, 50_000)), "exceeds the limit"),
    "short-raw": (pb.Image(pixels=bytes(783)), "exactly 784 bytes"),
    "long-raw": (pb.Image(pixels=bytes(1000)), "exactly 784 bytes"),
    "unset": (pb.Image(), "no data"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
@pytest.mark.parametrize("rpc", ["Classify", "Embed"])
def test_bad_image_is_invalid_argument_naming_the_index(stub, digits, case, rpc):
    bad, reason = BAD_IMAGES[case]
    images = _raw(digits[0][:2]) + [bad] + _raw(digits[0][2:3])
    request = pb.ClassifyRequest(images=images) if rpc == "Classify" else pb.EmbedRequest(images=images)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("image 2: ") and reason in info.value.details()
    assert len(_classify_labels(stub, digits[0][:3])) == 3  # still serving


@pytest.mark.parametrize("request_, code, text", [
    (pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    (pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    (pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))], options=pb.ImageOptions(invert=7)),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown invert value 7"),
    (pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "at most 64"),
    (pb.ClassifyRequest(images=[pb.Image(encoded=bytes(3 * 1024 * 1024))]), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max"),
])
def test_request_level_errors(stub, digits, request_, code, text):
    rpc = stub.Classify if isinstance(request_, pb.ClassifyRequest) else stub.Embed
    with pytest.raises(grpc.RpcError) as info:
        rpc(request_, timeout=10)
    assert info.value.code() == code and text in info.value.details()
    assert len(_classify_labels(stub, digits[0][:3])) == 3


def test_concurrent_clients_get_their_own_answers(stub, digits):
    images, _ = digits
    alone = _classify_labels(stub, images)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: _classify_labels(stub, images[i:i + 4]), list(range(0, 32, 4)) * 3))
    assert sum(together, []) == alone * 3


def test_one_debug_log_line_per_request(stub, onnx_server, digits, helpers):
    with pytest.raises(grpc.RpcError):
        stub.Embed(pb.EmbedRequest(images=[pb.Image(pixels=b"x")]), timeout=10)
    stub.Embed(pb.EmbedRequest(images=_raw(digits[0][:5])), timeout=10)

    def embeds() -> list[dict]:
        return [r for r in onnx_server.records if r.get("event") == "rpc" and r["method"].endswith("/Embed")]

    # Written before each answer, but read from the server's stderr on a thread here: wait for the line to arrive.
    helpers.wait_until(lambda: any(r["code"] == "OK" and r["images"] == 5 for r in embeds()), what="the OK line")
    embeds = embeds()
    assert any(r["code"] == "INVALID_ARGUMENT" and r["images"] == 1 for r in embeds)
    assert any(r["code"] == "OK" and r["images"] == 5 and r["ms"] >= 0 for r in embeds)
    ready = onnx_server.wait_for("ready")
    assert ready["backend"] == "onnxruntime" and ready["device"] == "cpu" and ready["model"] == "lsoftmax_mnist_onnx"
