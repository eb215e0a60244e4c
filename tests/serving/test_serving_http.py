"""The HTTP/REST transport against real servers (subprocesses): KServe v2 REST through tritonclient.http and
tritonclient.http.aio (binary extension and plain JSON), the typed API as JSON, raw image bodies and multipart
uploads, the same answers as over gRPC, bad input answered with a status and `{"error": ...}` while the server
keeps serving, the token, CORS, and metrics that count HTTP calls. Contract: docs/http_api.md.
Run: .venv/bin/python -m pytest tests/serving/test_serving_http.py -q"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket

import numpy as np
import pytest

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "lsoftmax_mnist_onnx"


@pytest.fixture(scope="module")
def http_address(onnx_server) -> str:
    return f"127.0.0.1:{onnx_server.wait_for('listening')['http_port']}"


def _request(address: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 30) -> tuple[int, dict, bytes]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _error(status_headers_body) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    return status, json.loads(body)["error"]


def _still_serving(address: str) -> None:
    request = {"images": [{"pixels": base64.b64encode(bytes(784)).decode()}]}
    status, _, body = _request(address, "POST", "/v1/classify", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200 and len(json.loads(body)["results"]) == 1


def _inputs(images: np.ndarray, binary: bool = True):
    tensor = httpclient.InferInput("image", [len(images), 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images.reshape(-1, 1, 28, 28).astype(np.uint8), binary_data=binary)
    return [tensor]


def test_tritonclient_http_health_metadata_and_config(http_address):
    client = httpclient.InferenceServerClient(http_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "7")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "lsoftmax-serve" and "binary_tensor_data" in metadata["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["versions"] == ["1"] and model["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in model["outputs"]][:2] == ["logits", "embedding"]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["backend"] == "onnxruntime" and config["max_batch_size"] > 0
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "Request for unknown model: 'no_such_model' is not found" in info.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infer_matches_the_graph_and_grpc(http_address, onnx_server, digits, model_repository,
                                                            helpers, binary):
    import grpc

    images, _ = digits
    client = httpclient.InferenceServerClient(http_address)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "embedding")]
    result = client.infer(MODEL, _inputs(images[:16], binary), outputs=outputs, request_id="r-1")
    logits, embedding = result.as_numpy("logits"), result.as_numpy("embedding")
    reference_logits, reference_embedding = helpers.reference_outputs(model_repository, "onnx", images[:16])
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embedding, reference_embedding, rtol=1e-4, atol=1e-4)
    assert result.get_response()["id"] == "r-1"
    with grpc.insecure_channel(onnx_server.address) as channel:
        typed = pb_grpc.DigitServiceStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(pixels=x.tobytes()) for x in images[:16]]))
    assert [r.label for r in typed.results] == list(np.argmax(logits, 1))


def test_tritonclient_http_default_outputs_come_back_binary(http_address, digits):
    client = httpclient.InferenceServerClient(http_address)
    result = client.infer(MODEL, _inputs(digits[0][:3]))  # no outputs named: binary_data_output
    assert result.as_numpy("logits").shape == (3, 10)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_tritonclient_http_aio(http_address, digits):
    import tritonclient.http.aio as aioclient

    async def run():
        client = aioclient.InferenceServerClient(http_address)
        try:
            assert await client.is_server_ready()
            result = await client.infer(MODEL, _inputs(digits[0][:4]))
            return result.as_numpy("logits")
        finally:
            await client.close()

    assert asyncio.run(run()).shape == (4, 10)


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_typed_json_raw_and_multipart_give_the_same_answers(http_address, onnx_server, digits):
    import grpc

    images, _ = digits
    pngs = [_png(x) for x in images[:3]]
    with grpc.insecure_channel(onnx_server.address) as channel:
        expected = pb_grpc.DigitServiceStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=p) for p in pngs], top_k=3, return_inputs=True))
    want = [(r.label, round(r.probability, 5), r.model_input) for r in expected.results]

    def labels(body: bytes) -> list:
        answer = json.loads(body)
        assert answer["modelName"] == MODEL
        return [(r["label"], round(r["probability"], 5), base64.b64decode(r["modelInput"]))
                for r in answer["results"]]

    request = {"images": [{"encoded": base64.b64encode(p).decode()} for p in pngs], "topK": 3, "returnInputs": True}
    status, _, body = _request(http_address, "POST", "/v1/classify", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200 and labels(body) == want
    assert len(json.loads(body)["results"][0]["topK"]) == 3
    status, _, body = _request(http_address, "POST", "/v1/classify?top_k=3&return_inputs=true", pngs[0],
                               {"Content-Type": "image/png"})
    assert status == 200 and labels(body) == want[:1]
    boundary = "lsoftmax-test-boundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file{i}\"; filename=\"d{i}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + p + b"\r\n" for i, p in enumerate(pngs))
    status, _, body = _request(http_address, "POST", "/v1/classify?top_k=3&return_inputs=1",
                               parts + f"--{boundary}--\r\n".encode(),
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and labels(body) == want


def test_typed_embed_and_model_info(http_address, digits):
    request = {"images": [{"pixels": base64.b64encode(x.tobytes()).decode()} for x in digits[0][:2]],
               "l2Normalize": True}
    status, _, body = _request(http_address, "POST", "/v1/embed", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})
    answer = json.loads(body)
    assert status == 200 and answer["dim"] == len(answer["embeddings"][0]["values"])
    assert abs(np.linalg.norm(answer["embeddings"][0]["values"]) - 1) < 1e-4
    status, _, body = _request(http_address, "GET", "/v1/model")
    info = json.loads(body)
    assert status == 200 and info["modelName"] == MODEL and info["maxImagesPerRequest"] == 64


def _infer_body(n: int = 1, **changes) -> dict:
    request = {"inputs": [{"name": "image", "shape": [n, 1, 28, 28], "datatype": "UINT8", "data": [0] * (784 * n)}]}
    request["inputs"][0].update(changes)
    return request


BAD_INFER = {
    "malformed json": (b"{not json", {}, 400, "not valid JSON"),
    "wrong shape": (json.dumps(_infer_body(shape=[1, 28, 28])).encode(), {}, 400, "unexpected shape"),
    "wrong datatype": (json.dumps(_infer_body(datatype="FP32")).encode(), {}, 400, "data-type is 'FP32'"),
    "too few values": (json.dumps(_infer_body(data=[0] * 10)).encode(), {}, 400, "needs 784 values"),
    "values out of range": (json.dumps(_infer_body(data=[300] * 784)).encode(), {}, 400, "0..255"),
    "header length beyond the body": (b"{}", {"Inference-Header-Content-Length": "500"}, 400, "beyond the body"),
}


@pytest.mark.parametrize("case", sorted(BAD_INFER))
def test_bad_infer_requests_get_400_and_the_server_keeps_serving(http_address, case):
    body, headers, status, text = BAD_INFER[case]
    got, message = _error(_request(http_address, "POST", f"/v2/models/{MODEL}/infer", body,
                                   {"Content-Type": "application/json", **headers}))
    assert got == status and text in message, message
    _still_serving(http_address)


def test_a_truncated_binary_payload_is_refused(http_address):
    header = json.dumps({"inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 1568}}]}).encode()
    status, message = _error(_request(http_address, "POST", f"/v2/models/{MODEL}/infer", header + bytes(1000),
                                      {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}))
    assert status == 400 and "binary_data_size 1568 but 1000 bytes" in message
    _still_serving(http_address)


def test_unknown_model_path_and_method(http_address):
    assert _error(_request(http_address, "POST", "/v2/models/nope/infer", b"{}"))[0] == 404
    assert _error(_request(http_address, "GET", "/v2/nowhere"))[0] == 404
    assert _error(_request(http_address, "DELETE", "/v1/classify"))[0] == 405


def test_a_content_type_that_does_not_match_the_body(http_address):
    status, message = _error(_request(http_address, "POST", "/v1/classify", b'{"images": []}',
                                      {"Content-Type": "image/png"}))
    assert status == 400 and "image 0" in message
    status, message = _error(_request(http_address, "POST", "/v1/classify", b"hello", {"Content-Type": "text/plain"}))
    assert status == 415 and "Content-Type" in message
    status, message = _error(_request(http_address, "POST", "/v1/classify", b"[1, 2]",
                                      {"Content-Type": "application/json"}))
    assert status == 400 and "ClassifyRequest" in message
    _still_serving(http_address)


def test_an_oversize_body_is_refused_before_it_is_read(http_address):
    """Content-Length over --max-message-bytes (2 MiB here): 413 with only the headers sent."""
    host, port = http_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode())
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413") and "--max-message-bytes" in answer
    _still_serving(http_address)


def test_static_paths_do_not_escape(http_address):
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
                 "/static/.hidden", "/static/%2e%2e%2f%2e%2e%2fpyproject.toml"):
        status, _, body = _request(http_address, "GET", path)
        assert status in (400, 404) and b"import" not in body, (path, status)


def test_metrics_count_http_calls(http_address, onnx_server, helpers):
    before = helpers.scrape(onnx_server)
    request = {"images": [{"pixels": base64.b64encode(bytes(784)).decode()}]}
    for _ in range(3):
        assert _request(http_address, "POST", "/v1/classify", json.dumps(request).encode(),
                        {"Content-Type": "application/json"})[0] == 200
    assert _request(http_address, "POST", f"/v2/models/{MODEL}/infer", b"{bad")[0] == 400
    after = helpers.scrape(onnx_server)

    def delta(name, **labels):
        return helpers.metric(after, name, model=MODEL, version="1", **labels) - helpers.metric(
            before, name, model=MODEL, version="1", **labels)

    assert delta("nv_inference_request_success") == 3
    assert delta("nv_inference_request_failure", reason="OTHER") == 1


def test_a_trickling_body_gets_408(model_repository, helpers):
    """--http-body-timeout is the feature's own clock: a body that stops arriving is dropped, whatever the speed."""
    with helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu",
                               "--http-body-timeout", "0.5").start() as server:
        port = server.wait_for("listening")["http_port"]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1000\r\n\r\n\x89PNG")
            answer = sock.recv(65536).decode("latin-1")
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        _still_serving(f"127.0.0.1:{port}")


def test_token_cors_and_headers(model_repository, helpers):
    with helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu", "--auth-token", "s3cret",
                               "--http-cors-origin", "https://app.example").start() as server:
        address = f"127.0.0.1:{server.wait_for('listening')['http_port']}"
        assert _request(address, "GET", "/v2/health/ready")[0] == 200  # health stays open
        status, headers, _ = _request(address, "GET", "/v2")
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        assert _request(address, "GET", "/v2", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, headers, _ = _request(address, "GET", "/v2", headers={"Authorization": "Bearer s3cret",
                                                                      "Origin": "https://app.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, _ = _request(address, "GET", "/v2", headers={"Authorization": "Bearer s3cret",
                                                                      "Origin": "https://evil.example"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        status, headers, _ = _request(address, "OPTIONS", "/v1/classify", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
        assert _request(address, "OPTIONS", "/v1/classify", headers={"Origin": "https://evil.example"})[0] == 403
        client = httpclient.InferenceServerClient(address)
        with pytest.raises(InferenceServerException):
            client.get_server_metadata()
        assert httpclient.InferenceServerClient(address).get_server_metadata(
            headers={"Authorization": "Bearer s3cret"})["name"] == "lsoftmax-serve"


def _one_held_at_the_backend(server, gates):
    """A classify request sent on a thread and held at the backend's gate until the test releases it: (address,
    the request body, the thread, the list its answer lands in)."""
    import threading

    address = f"127.0.0.1:{server.wait_for('listening')['http_port']}"
    request = json.dumps({"images": [{"pixels": base64.b64encode(bytes(784)).decode()}]}).encode()
    held: list = []
    since = len(server.records)
    gates.hold("infer")
    thread = threading.Thread(target=lambda: held.append(_request(
        address, "POST", "/v1/classify", request, {"Content-Type": "application/json"}, timeout=120)))
    thread.start()
    gates.wait_held(server, "infer", since=since)
    return address, request, thread, held


def test_sigterm_drains_http_too(model_repository, gates):
    """A request held at the backend finishes after SIGTERM; meanwhile new connections are refused (nothing sent,
    nothing lost), and on connections already open ready says 503 and new inference gets 503, each answer closing
    its connection."""
    import signal

    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu", "--grace-seconds", "60").start()
    try:
        address, request, thread, held = _one_held_at_the_backend(server, gates)
        host, port = address.rsplit(":", 1)
        kept = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(2)]
        for connection in kept:  # kept-alive connections from before the signal
            connection.request("GET", "/v2/health/live")
            assert connection.getresponse().read() == b""
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("stopping")
        for connection, (method, path, body) in zip(kept, [("GET", "/v2/health/ready", None),
                                                           ("POST", "/v1/classify", request)]):
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 503 and response.getheader("Connection") == "close", answer
            assert "shutting down" in answer["error"] or path.endswith("ready")
        with pytest.raises(ConnectionRefusedError):
            _request(address, "GET", "/v2/health/ready")
        gates.release()
        thread.join(120)
        assert held and held[0][0] == 200
        assert server.wait_exit(60) == 0
    finally:
        gates.release()
        server.kill()


def test_requests_over_the_concurrency_cap_get_429(model_repository, gates):
    """--max-concurrent-rpcs caps HTTP requests too: with one held at the backend, the next gets 429 at once."""
    server = gates.server(model_repository, "--backend", "onnx", "--device", "cpu", "--max-concurrent-rpcs", "1").start()
    try:
        address, request, thread, held = _one_held_at_the_backend(server, gates)
        status, headers, body = _request(address, "POST", "/v1/classify", request,
                                         {"Content-Type": "application/json"})
        assert status == 429 and headers.get("Retry-After") == "1"
        assert "--max-concurrent-rpcs" in json.loads(body)["error"]
        assert _request(address, "GET", "/v2/health/ready")[0] == 200  # health is not capped
        gates.release()
        thread.join(120)
        assert held and held[0][0] == 200
        _still_serving(address)
    finally:
        gates.release()
        server.kill()
