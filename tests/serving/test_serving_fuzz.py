"""Fuzz the session's ONNX server (subprocess, loopback) with 1,200 generated malformed requests over both APIs:
random bytes as images, truncated and bomb-sized PNGs, wrong raw lengths, empty batches, bad options, and in
KServe odd datatypes, shapes (any rank, zero, negative and 2^62 dimensions), byte counts, inputs and outputs,
plus messages over the size limit. Every one must be answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED, the server
must never log an internal error, and it must answer a good request afterwards.
KServe requests are built with tritonclient's messages (same wire format; ours must not meet them in one process).
Run: .venv/bin/python -m pytest tests/serving/test_serving_fuzz.py -q"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

triton_pb = pytest.importorskip("tritonclient.grpc.service_pb2")
triton_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")

MODEL = "lsoftmax_mnist_onnx"
MAX_IMAGES = 64  # SERVER_LIMITS of the session server
MAX_MESSAGE = 2 * 1024 * 1024
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
DATATYPES = ["BOOL", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES",
             "BF16", "uint8", "", "UINT8 ", "\x00"]


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def _bad_image(rng: np.random.Generator) -> pb.Image:
    kind = rng.integers(7)
    if kind == 0:
        return pb.Image(encoded=rng.bytes(int(rng.integers(1, 3000))))
    if kind == 1:
        png = _png(rng)
        return pb.Image(encoded=png[:int(rng.integers(1, len(png) - 24))])  # into the pixel data
    if kind == 2:
        side = int(rng.choice([50_000, 65_535, 1 << 30, 0]))
        return pb.Image(encoded=_png_header(side, int(rng.choice([side, 1, 100_000]))) + rng.bytes(64))
    if kind == 3:
        length = int(rng.choice([0, 1, 783, 785, 1568, int(rng.integers(2, 5000))]))
        return pb.Image(pixels=rng.bytes(length))
    if kind == 4:
        return pb.Image()  # neither field set
    if kind == 5:
        return pb.Image(encoded=b"GIF89a" + rng.bytes(int(rng.integers(0, 40))))
    return pb.Image(encoded=b"")


def typed_cases(rng: np.random.Generator, n: int) -> list:
    good = [pb.Image(pixels=rng.integers(0, 256, 784, dtype=np.uint8).tobytes()) for _ in range(4)]
    cases = []
    for _ in range(n):
        kind = rng.integers(8)
        embed = kind != 7 and rng.random() < 0.3
        message, method = (pb.EmbedRequest, "Embed") if embed else (pb.ClassifyRequest, "Classify")
        if kind <= 3:  # one or more bad images hidden among good ones
            images = list(good[:int(rng.integers(0, 4))])
            images.insert(int(rng.integers(0, len(images) + 1)), _bad_image(rng))
            request = message(images=images)
        elif kind == 4:
            request = message()  # empty batch
        elif kind == 5:
            request = message(images=good, options=pb.ImageOptions(invert=int(rng.choice([3, 99, -1])),
                                                                  fit=int(rng.choice([0, 7]))))
            if request.options.invert in (0, 1, 2) and request.options.fit in (0, 1, 2):
                request.options.fit = 7
        elif kind == 6:
            request = message(images=good * int(rng.integers(17, 40)))  # > MAX_IMAGES
        else:
            request = message(images=good, top_k=int(rng.choice([11, 1000, 4_000_000_000])))
        cases.append((method, request))
    return cases


def _shape(rng: np.random.Generator) -> list[int]:
    rank = int(rng.integers(0, 7))
    pool = [0, 1, 2, 28, 27, 29, -1, -784, 1 << 40, (1 << 62), 65, MAX_IMAGES + 1]
    shape = [int(rng.choice(pool)) for _ in range(rank)]
    if rank == 4 and rng.random() < 0.5:
        shape[1:] = [1, 28, 28]  # only the batch axis is odd
    return shape


def kserve_cases(rng: np.random.Generator, n: int) -> list:
    cases = []
    for _ in range(n):
        request = triton_pb.ModelInferRequest(model_name=MODEL)
        images = int(rng.integers(1, 5))
        kind = rng.integers(9)
        shape, datatype, raw = [images, 1, 28, 28], "UINT8", rng.bytes(images * 784)
        if kind == 0:
            datatype = str(rng.choice(DATATYPES))
        elif kind == 1:
            shape = _shape(rng)
            if shape == [images, 1, 28, 28]:
                shape = [images, 2, 28, 28]
        elif kind == 2:
            raw = raw[:int(rng.integers(0, len(raw)))] if rng.random() < 0.5 else raw + rng.bytes(int(rng.integers(1, 900)))
        elif kind == 3:
            shape = [0, 1, 28, 28]
            raw = b""
        if kind == 4:
            pass  # no inputs at all
        elif kind == 5:
            request.inputs.add(name=str(rng.choice(["images", "IMAGE", ""])), datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        else:
            request.inputs.add(name="image", datatype=datatype, shape=shape)
            if kind == 6:
                request.inputs.add(name="image", datatype=datatype, shape=shape)
                request.raw_input_contents.extend([raw, raw])
            elif kind == 7:
                request.raw_input_contents.extend([raw, raw])
            elif kind == 8:  # typed contents out of range, or an unknown output
                if rng.random() < 0.5:
                    request.inputs[0].contents.uint_contents.extend([256 + int(rng.integers(0, 1000))] * (images * 784))
                else:
                    request.raw_input_contents.append(raw)
                    request.outputs.add(name=str(rng.choice(["probabilities", "LOGITS", ""])))
            else:
                request.raw_input_contents.append(raw)
        cases.append(("ModelInfer", request))
    return cases


def oversize_cases() -> list:
    big = pb.Image(pixels=bytes(784))
    typed = pb.ClassifyRequest(images=[pb.Image(encoded=bytes(MAX_MESSAGE + 10))])
    kserve = triton_pb.ModelInferRequest(model_name=MODEL)
    kserve.inputs.add(name="image", datatype="UINT8", shape=[3000, 1, 28, 28])
    kserve.raw_input_contents.append(bytes(3000 * 784))
    return [("Classify", typed), ("Embed", pb.EmbedRequest(images=[big] * 3000)), ("ModelInfer", kserve)] * 4


def _describe(method: str, request) -> str:
    """A request an answer surprised us with, without pages of pixel bytes."""
    if method == "ModelInfer":
        return str(request)[:300]
    images = [(i.WhichOneof("data"), len(i.encoded or i.pixels), (i.encoded or i.pixels)[:12]) for i in request.images]
    return f"{len(images)} images {images[:5]} options {request.options} top_k {getattr(request, 'top_k', None)}"


def test_malformed_requests_are_refused_and_the_server_keeps_serving(onnx_server, digits):
    rng = np.random.default_rng(2024)
    cases = typed_cases(rng, 600) + kserve_cases(rng, 600) + oversize_cases()
    assert len(cases) >= 1000
    with grpc.insecure_channel(onnx_server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        typed, kserve = pb_grpc.DigitServiceStub(channel), triton_grpc.GRPCInferenceServiceStub(channel)
        calls = {"Classify": typed.Classify, "Embed": typed.Embed, "ModelInfer": kserve.ModelInfer}

        def send(case) -> tuple[str, grpc.StatusCode, str]:
            method, request = case
            try:
                calls[method](request, timeout=30)
            except grpc.RpcError as err:
                return method, err.code(), err.details() or ""
            return method, grpc.StatusCode.OK, _describe(method, request)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, cases))
        unexpected = [a for a in answers if a[1] not in EXPECTED]
        assert not unexpected, unexpected[:5]
        codes = {code for _, code, _ in answers}
        assert codes == EXPECTED
        image_errors = [d for m, c, d in answers if m != "ModelInfer" and d.startswith("image ")]
        assert len(image_errors) > 100  # bad images are named by index

        good = pb.ClassifyRequest(images=[pb.Image(pixels=x.tobytes()) for x in digits[0][:8]])
        assert len(typed.Classify(good, timeout=10).results) == 8
    assert onnx_server.proc.poll() is None
    assert not [r for r in onnx_server.records if r.get("code") == "INTERNAL" or "exception" in r]


def _http_cases(rng: np.random.Generator, n: int) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body): malformed HTTP requests over both HTTP APIs."""
    good = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    cases = []
    for i in range(n):
        kind = i % 8
        infer = f"/v2/models/{MODEL}/infer"
        if kind == 0:  # random bytes as JSON
            cases.append(("POST", infer, {"Content-Type": "application/json"}, rng.bytes(int(rng.integers(0, 200)))))
        elif kind == 1:  # a good request with one field replaced by junk
            body = {"inputs": [dict(good["inputs"][0])]}
            key = ["name", "shape", "datatype", "data", "parameters"][int(rng.integers(0, 5))]
            body["inputs"][0][key] = [None, -1, "x", [1.5], {"binary_data_size": -3}, [[]], 2 ** 70][
                int(rng.integers(0, 7))]
            cases.append(("POST", infer, {"Content-Type": "application/json"}, json.dumps(body).encode()))
        elif kind == 2:  # the binary extension with a wrong header length or a short payload
            header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                             "parameters": {"binary_data_size": 784}}]}).encode()
            length = int(rng.choice([-1, 0, len(header) - 3, len(header) + 5000, len(header)]))
            tail = bytes(int(rng.integers(0, 900)))
            if length == len(header) and len(tail) == 784:
                tail = tail[:-1]
            cases.append(("POST", infer, {"Inference-Header-Content-Length": str(length)}, header + tail))
        elif kind == 3:  # outputs that do not exist, ids of every type
            body = dict(good, outputs=[{"name": rng.bytes(4).hex()}], id=[1, {"a": 2}, None][int(rng.integers(0, 3))])
            cases.append(("POST", infer, {"Content-Type": "application/json"}, json.dumps(body).encode()))
        elif kind == 4:  # random bytes as an image
            cases.append(("POST", "/v1/classify", {"Content-Type": "image/png"}, rng.bytes(int(rng.integers(1, 300)))))
        elif kind == 5:  # typed JSON with junk
            junk = [{"images": "x"}, {"images": [{"encoded": "%%%"}]}, {"topK": -1, "images": []},
                    {"images": [{"pixels": "AAAA"}]}, {"nope": 1}, [1, 2], {"options": {"invert": "SIDEWAYS"}}]
            cases.append(("POST", ["/v1/classify", "/v1/embed"][i % 2], {"Content-Type": "application/json"},
                          json.dumps(junk[int(rng.integers(0, len(junk)))]).encode()))
        elif kind == 6:  # multipart with a broken boundary or no file
            boundary = rng.bytes(6).hex()
            body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--{boundary}--\r\n"
            cases.append(("POST", "/v1/classify", {"Content-Type": f"multipart/form-data; boundary={boundary[:3]}"},
                          body.encode()))
        else:  # bad query options with a good image
            query = ["top_k=0", "top_k=x", "top_k=11", "invert=up", "fit=2", "return_inputs=maybe"][int(rng.integers(0, 6))]
            cases.append(("POST", f"/v1/classify?{query}", {"Content-Type": "image/png"}, _png(rng)))
    return cases


def test_malformed_http_requests_are_refused_and_the_server_keeps_serving(onnx_server):
    """Every malformed HTTP request gets a 4xx with a JSON error (never a 5xx), and a good request works after."""
    import http.client

    port = onnx_server.wait_for("listening")["http_port"]
    rng = np.random.default_rng(7)

    def send(case):
        method, path, headers, body = case
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), path
        finally:
            connection.close()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, _http_cases(rng, 400)))
    for status, body, path in answers:
        assert 400 <= status < 500, (status, path, body[:200])
        assert "error" in json.loads(body), body[:200]
    good = json.dumps({"images": [{"pixels": __import__("base64").b64encode(bytes(784)).decode()}]}).encode()
    assert send(("POST", "/v1/classify", {"Content-Type": "application/json"}, good))[0] == 200
    assert not [line for line in onnx_server.lines if "unhandled exception" in line]


def _wire_cases() -> list[tuple[str, bytes]]:
    """Requests as bytes on the wire, malformed where http.client would not let a test be: the request line and
    headers, framing, encodings and bodies that once answered 500 or logged a traceback."""
    deep = b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"

    def post(path: str, headers: str, body: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n").encode() + body

    infer = f"/v2/models/{MODEL}/infer"
    return [
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)),  # a TLS ClientHello
        ("bad request line", b"GET\r\n\r\n"),
        ("bad method", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("bad header", b"GET / HTTP/1.1\r\nHost x\r\n\r\n"),
        ("huge header", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n"),
        ("two lengths", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        ("bad chunked", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("nul in a static path", b"GET /static/app.js%00.png HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("dot dot", b"GET /static/..%2F..%2Fserver.py HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("deep json", post(infer, "Content-Type: application/json\r\n", deep)),
        ("not gzip", post(infer, "Content-Type: application/json\r\nContent-Encoding: gzip\r\n", b"plain text")),
        ("unknown encoding", post(infer, "Content-Type: application/json\r\nContent-Encoding: zstd\r\n", b"x")),
        ("non-latin-1 boundary", post("/v1/classify", "Content-Type: multipart/form-data; boundary=\u00e9\u4e2d\r\n"
                                      .encode("utf-8").decode("latin-1"), b"--x\r\n\r\nx\r\n--x--")),
        ("typed json list", post("/v1/classify", "Content-Type: application/json\r\n", b"[1, 2]")),
        ("typed json wrong types", post("/v1/classify", "Content-Type: application/json\r\n",
                                        b'{"images": [{"encoded": 5}], "top_k": "x"}')),
        ("huge numbers", post(infer, "Content-Type: application/json\r\n",
                              json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                                      "data": [1e300] * 784}]}).encode())),
        ("json header length beyond", post(infer, "Inference-Header-Content-Length: 99999\r\n", b"{}")),
        ("cut mid-body", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nabc"),
    ]


@pytest.mark.parametrize("name, raw", _wire_cases(), ids=[name for name, _ in _wire_cases()])
def test_malformed_wire_requests_get_a_4xx_and_no_traceback(onnx_server, name, raw):
    """Whatever arrives, the answer (if the request could be read at all) is a 4xx, the log gets no traceback and
    no error line, and the server answers the next client."""
    import socket

    port = onnx_server.wait_for("listening")["http_port"]
    since = len(onnx_server.lines)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        if name == "cut mid-body":
            sock.shutdown(socket.SHUT_WR)  # the client goes away before its body is complete
        answer = b""
        try:
            while not answer.endswith(b"}") and len(answer) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (name, answer[:300])
    status, _, _ = _http_get(port, "/v2/health/ready")
    assert status == 200
    new = onnx_server.lines[since:]
    assert not [line for line in new if "Traceback" in line or '"exception"' in line or '"level": "error"' in line
                or not line.startswith("{")], new


def _http_get(port: int, path: str):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()
