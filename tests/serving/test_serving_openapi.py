"""serving/http/openapi.json, the HTTP API's machine-readable contract (docs/http_api.md), checked two ways: it is
a valid OpenAPI document, and a real server's answers match it. One ONNX server (CPU, --http-port 0) for the
module; every operation the document lists is called once or more with a good request, and every path with a
documented error is called with a bad one. Each answer's status must be documented for its path, its content
type documented for that status, and its JSON body (or a binary answer's JSON header) must validate against the
documented schema ($refs resolved through a referencing Registry holding the whole document). Good JSON request
bodies are validated against the documented request schemas too, so the document describes what the server takes.
HTTP with urllib only.
Run: .venv/bin/python -m pytest tests/serving/test_serving_openapi.py -q"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from PIL import Image
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from support import synthetic_digits

SPEC_PATH = Path(__file__).resolve().parents[2] / "serving" / "http" / "openapi.json"
BASE_URI = "urn:lsoftmax-serve:openapi"
MODEL, VERSION = "lsoftmax_mnist_onnx", "1"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


# ------------------------------------------------------------------ the document


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


@pytest.fixture(scope="module")
def registry(spec) -> Registry:
    return Registry().with_resource(BASE_URI, DRAFT202012.create_resource(spec))


def test_document_is_valid_openapi(spec):
    validate_spec(spec)
    assert spec["openapi"].startswith("3.")


def test_document_security(spec):
    """Bearer everywhere but the page, its files, health and the document itself."""
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["security"] == [{"bearer": []}]
    open_paths = {"/", "/static/{file}", "/v2/health/live", "/v2/health/ready", "/v2/openapi.json"}
    for path, item in spec["paths"].items():
        for method, operation in _operations(item):
            if path in open_paths:
                assert operation.get("security") == [], (method, path)
            else:
                assert "security" not in operation, (method, path)
                assert "401" in operation["responses"], (method, path)


def _operations(item: dict):
    return [(m, item[m]) for m in METHODS if m in item]


def _deref(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target = spec
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _absolute(schema):
    """The schema with its document-relative $refs made absolute (resolved in the registry's copy)."""
    if isinstance(schema, dict):
        return {k: (BASE_URI + v if k == "$ref" and v.startswith("#") else _absolute(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_absolute(v) for v in schema]
    return schema


def _check_json(registry: Registry, schema: dict, value, what: str) -> None:
    validator = Draft202012Validator(_absolute(schema), registry=registry)
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in validator.iter_errors(value)]
    assert not problems, f"{what} does not match the document:\n" + "\n".join(problems[:20]) + \
        f"\nbody: {json.dumps(value)[:2000]}"


# ------------------------------------------------------------------ the server


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


@pytest.fixture(scope="module")
def server(helpers, model_repository):
    process = helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu", "--http-port", "0")
    try:
        process.start()
        process.http_port = int(process.wait_for("listening")["http_port"])
    except BaseException:
        process.kill()
        raise
    yield process
    try:
        process.stop_cleanly()
    except subprocess.TimeoutExpired:
        process.kill()


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return Reply(reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def check_reply(spec: dict, registry: Registry, template: str, method: str, reply: Reply) -> object:
    """The answer against the document: status documented for the path (for the method when the path serves it),
    content type documented for that status, body valid. Returns the parsed JSON (header) or the raw body."""
    item = spec["paths"][template]
    what = f"{method.upper()} {template} → {reply.status}"
    if method in item:
        responses = item[method]["responses"]
    else:  # a method the path does not serve: 405, documented on the path's operations
        responses = {}
        for _, operation in _operations(item):
            responses.update(operation["responses"])
    assert str(reply.status) in responses, f"{what}: status not documented (has {sorted(responses)}); " \
                                           f"body {reply.body[:500]!r}"
    response = _deref(spec, responses[str(reply.status)])
    content = response.get("content")
    if not content:
        return reply.body
    assert reply.media_type in content, f"{what}: content type {reply.media_type!r} not documented " \
                                        f"({sorted(content)}); body {reply.body[:300]!r}"
    schema = content[reply.media_type].get("schema", {})
    if reply.media_type == "application/json":
        try:
            value = json.loads(reply.body)
        except ValueError:
            raise AssertionError(f"{what}: not JSON: {reply.body[:500]!r}") from None
        _check_json(registry, schema, value, what)
        return value
    if reply.media_type == "application/octet-stream" and template.endswith("/infer"):
        assert "inference-header-content-length" in reply.headers, f"{what}: binary answer without its header length"
        size = int(reply.headers["inference-header-content-length"])
        header = json.loads(reply.body[:size])
        infer_schema = content["application/json"]["schema"]
        _check_json(registry, infer_schema, header, what + " (binary answer's JSON header)")
        sizes = [o.get("parameters", {}).get("binary_data_size", 0) for o in header["outputs"]]
        assert sum(sizes) == len(reply.body) - size, (sizes, len(reply.body), size)
        return header, reply.body[size:]
    return reply.body


def request_schema(spec: dict, template: str, method: str, media_type: str) -> dict:
    body = _deref(spec, spec["paths"][template][method]["requestBody"])
    assert media_type in body["content"], f"{method.upper()} {template}: request type {media_type} not documented"
    return body["content"][media_type].get("schema", {})


# ------------------------------------------------------------------ requests


@dataclass
class Case:
    name: str
    method: str
    template: str
    path: str
    status: int
    body: object = None  # dict/list: JSON; bytes: sent as is
    headers: dict = field(default_factory=dict)

    def encoded(self) -> tuple[bytes | None, dict]:
        if self.body is None:
            return None, dict(self.headers)
        if isinstance(self.body, (bytes, bytearray)):
            return bytes(self.body), dict(self.headers)
        return json.dumps(self.body).encode(), {"Content-Type": "application/json", **self.headers}


def _images(n: int = 3) -> np.ndarray:
    """n synthetic 28x28 uint8 digits, white on black (the cases are built at collection, before fixtures)."""
    return synthetic_digits(n, seed=5)[0]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for index, (content_type, data) in enumerate(files):
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file{index}\"; "
                     f"filename=\"digit{index}.png\"\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _binary_infer(images: np.ndarray, size: int | None = None) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(images.reshape(-1, 1, 28, 28), dtype=np.uint8).tobytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": [len(images), 1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(raw) if size is None else size}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                     {"name": "embedding"}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def good_cases() -> list[Case]:
    images = _images(3)
    png = [_png(image) for image in images]
    infer_json = {"id": "openapi-1", "inputs": [{"name": "image", "shape": [3, 1, 28, 28], "datatype": "UINT8",
                                                 "data": images.reshape(-1).tolist()}]}
    infer_nested = {"inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                "data": images[:2].reshape(2, 1, 28, 28).tolist()}],
                    "outputs": [{"name": "logits"}]}
    binary_body, binary_headers = _binary_infer(images[:2])
    multipart, multipart_type = _multipart([("image/png", p) for p in png[:2]])
    model, version = f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/{VERSION}"
    return [
        Case("live", "get", "/v2/health/live", "/v2/health/live", 200),
        Case("ready", "get", "/v2/health/ready", "/v2/health/ready", 200),
        Case("server metadata", "get", "/v2", "/v2", 200),
        Case("model metadata", "get", "/v2/models/{model}", model, 200),
        Case("version metadata", "get", "/v2/models/{model}/versions/{version}", version, 200),
        Case("model ready", "get", "/v2/models/{model}/ready", model + "/ready", 200),
        Case("version ready", "get", "/v2/models/{model}/versions/{version}/ready", version + "/ready", 200),
        Case("model config", "get", "/v2/models/{model}/config", model + "/config", 200),
        Case("version config", "get", "/v2/models/{model}/versions/{version}/config", version + "/config", 200),
        Case("infer json", "post", "/v2/models/{model}/infer", model + "/infer", 200, infer_json),
        Case("infer nested", "post", "/v2/models/{model}/versions/{version}/infer", version + "/infer", 200,
             infer_nested),
        Case("infer binary", "post", "/v2/models/{model}/infer", model + "/infer", 200, binary_body,
             binary_headers),
        Case("classify json", "post", "/v1/classify", "/v1/classify", 200,
             {"images": [{"encoded": _b64(p)} for p in png] + [{"pixels": _b64(images[0].tobytes())}],
              "topK": 3, "returnLogits": True, "returnInputs": True,
              "options": {"invert": "INVERT_AUTO", "fit": "FIT_AUTO"}}),
        Case("classify png", "post", "/v1/classify",
             "/v1/classify?top_k=2&return_inputs=true&return_logits=false&invert=never&fit=resize", 200, png[0],
             {"Content-Type": "image/png"}),
        Case("classify multipart", "post", "/v1/classify", "/v1/classify?top_k=2", 200, multipart,
             {"Content-Type": multipart_type}),
        Case("embed json", "post", "/v1/embed", "/v1/embed", 200,
             {"images": [{"encoded": _b64(p)} for p in png[:2]], "l2Normalize": True,
              "options": {"invert": "INVERT_NEVER", "fit": "FIT_DIGIT"}}),
        Case("embed png", "post", "/v1/embed", "/v1/embed?l2_normalize=true&invert=auto&fit=auto", 200, png[1],
             {"Content-Type": "image/png"}),
        Case("model info", "get", "/v1/model", "/v1/model", 200),
        Case("page", "get", "/", "/", 200),
        Case("static", "get", "/static/{file}", "/static/app.js", 200),
        Case("openapi", "get", "/v2/openapi.json", "/v2/openapi.json", 200),
    ]


def error_cases() -> list[Case]:
    images = _images(2)
    good_infer = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                              "data": images[0].reshape(-1).tolist()}]}
    wrong_shape = {"inputs": [{"name": "image", "shape": [1, 1, 27, 28], "datatype": "UINT8",
                               "data": images[0].reshape(-1).tolist()[:27 * 28]}]}
    wrong_type = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                              "data": images[0].reshape(-1).tolist()}]}
    short_binary, short_headers = _binary_infer(images[:1], size=100)
    version = f"/v2/models/{MODEL}/versions/{VERSION}"
    json_type = {"Content-Type": "application/json"}
    return [
        Case("live POST", "post", "/v2/health/live", "/v2/health/live", 405, b"", json_type),
        Case("ready POST", "post", "/v2/health/ready", "/v2/health/ready", 405, b"", json_type),
        Case("server metadata DELETE", "delete", "/v2", "/v2", 405),
        Case("unknown model metadata", "get", "/v2/models/{model}", "/v2/models/no_such_model", 404),
        Case("unknown version metadata", "get", "/v2/models/{model}/versions/{version}",
             f"/v2/models/{MODEL}/versions/99", 404),
        Case("unknown model ready", "get", "/v2/models/{model}/ready", "/v2/models/no_such_model/ready", 404),
        Case("unknown version ready", "get", "/v2/models/{model}/versions/{version}/ready",
             f"/v2/models/{MODEL}/versions/99/ready", 404),
        Case("unknown model config", "get", "/v2/models/{model}/config", "/v2/models/no_such_model/config", 404),
        Case("unknown version config", "get", "/v2/models/{model}/versions/{version}/config",
             f"/v2/models/{MODEL}/versions/99/config", 404),
        Case("unknown model infer", "post", "/v2/models/{model}/infer", "/v2/models/no_such_model/infer", 404,
             good_infer),
        Case("unknown version infer", "post", "/v2/models/{model}/versions/{version}/infer",
             f"/v2/models/{MODEL}/versions/99/infer", 404, good_infer),
        Case("infer malformed json", "post", "/v2/models/{model}/infer", f"/v2/models/{MODEL}/infer", 400,
             b'{"inputs": [', json_type),
        Case("infer wrong shape", "post", "/v2/models/{model}/versions/{version}/infer", version + "/infer", 400,
             wrong_shape),
        Case("infer wrong datatype", "post", "/v2/models/{model}/infer", f"/v2/models/{MODEL}/infer", 400,
             wrong_type),
        Case("infer binary size mismatch", "post", "/v2/models/{model}/infer", f"/v2/models/{MODEL}/infer", 400,
             short_binary, short_headers),
        Case("infer GET", "get", "/v2/models/{model}/infer", f"/v2/models/{MODEL}/infer", 405),
        Case("classify malformed json", "post", "/v1/classify", "/v1/classify", 400, b"{not json", json_type),
        Case("classify corrupt png", "post", "/v1/classify", "/v1/classify", 400, b"\x89PNG\r\n\x1a\nbroken",
             {"Content-Type": "image/png"}),
        Case("classify bad invert", "post", "/v1/classify", "/v1/classify?invert=sideways", 400,
             _png(images[0]), {"Content-Type": "image/png"}),
        Case("classify text/plain", "post", "/v1/classify", "/v1/classify", 415, b"seven",
             {"Content-Type": "text/plain"}),
        Case("classify GET", "get", "/v1/classify", "/v1/classify", 405),
        Case("embed malformed json", "post", "/v1/embed", "/v1/embed", 400, b"[1, 2", json_type),
        Case("embed text/plain", "post", "/v1/embed", "/v1/embed", 415, b"seven", {"Content-Type": "text/plain"}),
        Case("model info POST", "post", "/v1/model", "/v1/model", 405, b"{}", json_type),
        Case("page POST", "post", "/", "/", 405, b"", json_type),
        Case("unknown static file", "get", "/static/{file}", "/static/no-such-file.js", 404),
        Case("openapi POST", "post", "/v2/openapi.json", "/v2/openapi.json", 405, b"", json_type),
    ]


def _ids(cases):
    return [c.name for c in cases]


GOOD = good_cases()
ERRORS = error_cases()


def test_cases_cover_the_document(spec):
    """Every operation the document lists gets a good request, and every path with a documented client error
    (400, 404, 405, 415) gets a bad one."""
    operations = {(m, p) for p, item in spec["paths"].items() for m, _ in _operations(item)}
    assert operations == {(c.method, c.template) for c in GOOD}
    client_errors = {"400", "404", "405", "415"}
    documented = {p for p, item in spec["paths"].items()
                  for _, op in _operations(item) if client_errors & set(op["responses"])}
    assert documented == {c.template for c in ERRORS}


def _send(server, case: Case) -> Reply:
    body, headers = case.encoded()
    return call(server, case.method.upper(), case.path, body, headers)


@pytest.mark.parametrize("case", GOOD, ids=_ids(GOOD))
def test_good_request(server, spec, registry, case: Case):
    if isinstance(case.body, dict):  # the document must describe what the server takes
        _check_json(registry, request_schema(spec, case.template, case.method, "application/json"), case.body,
                    f"request {case.name}")
    elif case.body is not None:
        request_schema(spec, case.template, case.method, case.headers["Content-Type"].split(";")[0])
    reply = _send(server, case)
    assert reply.status == case.status, f"{case.name}: {reply.status} {reply.body[:1000]!r}"
    value = check_reply(spec, registry, case.template, case.method, reply)

    # a few answers the schema alone cannot pin down
    if case.name == "infer json":
        assert value["model_name"] == MODEL and value.get("id") == "openapi-1"
        for output in value["outputs"]:
            assert output["shape"][0] == 3 and len(output["data"]) == int(np.prod(output["shape"]))
    elif case.name == "infer nested":
        assert [o["name"] for o in value["outputs"]] == ["logits"] and value["outputs"][0]["shape"][0] == 2
    elif case.name == "infer binary":
        assert reply.media_type == "application/octet-stream", reply.headers
        header, raw = value
        logits, embedding = header["outputs"]
        assert logits["name"] == "logits" and "data" not in logits
        assert logits["parameters"]["binary_data_size"] == len(raw) == 4 * int(np.prod(logits["shape"]))
        assert embedding["name"] == "embedding" and len(embedding["data"]) == int(np.prod(embedding["shape"]))
        assert np.isfinite(np.frombuffer(raw, "<f4")).all()
    elif case.name == "classify json":
        assert len(value["results"]) == 4 and value["modelName"] == MODEL
        assert all(len(r["topK"]) == 3 and len(r["logits"]) == 10 and len(base64.b64decode(r["modelInput"])) == 784
                   for r in value["results"])
    elif case.name == "classify png":
        (result,) = value["results"]
        assert len(result["topK"]) == 2 and result["logits"] == [] and len(base64.b64decode(result["modelInput"])) \
            == 784
    elif case.name == "classify multipart":
        assert len(value["results"]) == 2 and all(r["modelInput"] == "" for r in value["results"])
    elif case.name.startswith("embed"):
        assert all(len(e["values"]) == value["dim"] for e in value["embeddings"])
        norms = [np.linalg.norm(e["values"]) for e in value["embeddings"]]
        assert np.allclose(norms, 1, atol=1e-4) or not any(norms), norms
    elif case.name == "model info":
        assert value["modelName"] == MODEL and value["backend"] == "onnxruntime" and value["device"] == "cpu"
        json.loads(value["manifestJson"])
    elif case.name == "openapi":
        served = json.loads(reply.body)
        mine = json.loads(SPEC_PATH.read_text())
        assert served["paths"] == mine["paths"] and served["components"] == mine["components"]
    elif case.name == "page":
        assert reply.media_type == "text/html" and b"<" in reply.body


@pytest.mark.parametrize("case", ERRORS, ids=_ids(ERRORS))
def test_error_request(server, spec, registry, case: Case):
    reply = _send(server, case)
    assert reply.status == case.status, f"{case.name}: {reply.status} {reply.body[:1000]!r}"
    assert reply.media_type == "application/json", f"{case.name}: every error is JSON: {reply.headers} " \
                                                   f"{reply.body[:300]!r}"
    value = check_reply(spec, registry, case.template, case.method, reply)
    _check_json(registry, {"$ref": "#/components/schemas/Error"}, value, case.name)
    if case.name == "classify corrupt png":
        assert "0" in value["error"], value  # names the image index


def test_unknown_path_is_a_json_404(server, spec, registry):
    reply = call(server, "GET", "/v2/no/such/path")
    assert reply.status == 404 and reply.media_type == "application/json", (reply.status, reply.body[:300])
    _check_json(registry, {"$ref": "#/components/schemas/Error"}, json.loads(reply.body), "unknown path")
