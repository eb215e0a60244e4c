"""KServe v2 (inference.GRPCInferenceService) checked with the real tritonclient against a server that loads
every model of the repository. tritonclient's generated `inference.*` messages clash with ours in one
process, so this process never imports serving._proto.inference: raw requests use tritonclient's own
messages (same wire format), and our descriptors are compared with tritonclient's in subprocesses.
Run: .venv/bin/python -m pytest tests/serving/test_serving_kserve.py -q"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = ("lsoftmax_mnist_onnx", "lsoftmax_mnist_torchscript")

_DUMP = textwrap.dedent("""
    import importlib, json, sys
    module = importlib.import_module(sys.argv[1])
    out, enums = {}, {}
    def visit_enum(enum):
        enums[enum.full_name] = {v.name: v.number for v in enum.values}
    def visit(msg):
        out[msg.full_name] = {f.name: [f.number, f.type, f.is_repeated,
                                       f.message_type.full_name if f.message_type else None,
                                       f.enum_type.full_name if f.enum_type else None,
                                       f.containing_oneof.name if f.containing_oneof else None] for f in msg.fields}
        for nested in msg.nested_types:
            visit(nested)
        for enum in msg.enum_types:
            visit_enum(enum)
    for msg in module.DESCRIPTOR.message_types_by_name.values():
        visit(msg)
    for enum in module.DESCRIPTOR.enum_types_by_name.values():
        visit_enum(enum)
    services = module.DESCRIPTOR.services_by_name
    methods = ({m.name: [m.input_type.full_name, m.output_type.full_name]
                for m in services["GRPCInferenceService"].methods} if "GRPCInferenceService" in services else {})
    print(json.dumps({"messages": out, "enums": enums, "methods": methods}))
""")


def _descriptors(module: str, cwd) -> dict:
    return json.loads(subprocess.check_output([sys.executable, "-c", _DUMP, module], cwd=cwd, text=True))


@pytest.mark.parametrize("ours, theirs", [
    ("serving._proto.inference.grpc_service_pb2", "tritonclient.grpc.service_pb2"),
    ("serving._proto.inference.model_config_pb2", "tritonclient.grpc.model_config_pb2"),
])
def test_our_proto_matches_the_public_protocol(helpers, ours, theirs):
    """Every field we declare has Triton's number, type and cardinality; every enum value its number."""
    ours, theirs = _descriptors(ours, helpers.PROJECT_ROOT), _descriptors(theirs, helpers.PROJECT_ROOT)
    for name, fields in ours["messages"].items():
        assert fields == {k: theirs["messages"][name][k] for k in fields}, name
    for name, values in ours["enums"].items():
        assert values == {k: theirs["enums"][name][k] for k in values}, name
    assert ours["methods"] == {k: theirs["methods"][k] for k in ours["methods"]}
    if ours["methods"]:
        assert set(ours["methods"]) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                        "ModelConfig", "ModelInfer"}


@pytest.fixture(scope="module")
def all_models_server(model_repository, helpers):
    server = helpers.ServerProcess(model_repository, "--device", "cpu", "--max-queue-delay-us", "200",
                                   *helpers.SERVER_LIMITS).start()
    yield server
    server.stop_cleanly()


@pytest.fixture(scope="module")
def triton(all_models_server):
    client = tc.InferenceServerClient(all_models_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def raw_stub(all_models_server):
    with grpc.insecure_channel(all_models_server.address) as channel:
        yield triton_grpc.GRPCInferenceServiceStub(channel)


def test_liveness_readiness_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    for name in MODELS:
        assert triton.is_model_ready(name) and triton.is_model_ready(name, "1")
    assert not triton.is_model_ready(MODELS[0], "2")
    assert not triton.is_model_ready("no_such_model")
    assert triton.get_server_metadata(as_json=True)["name"] == "lsoftmax-serve"
    meta = triton.get_model_metadata(MODELS[0], as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", ["-1", "10"]), ("embedding", "FP32", ["-1", "128"]), ("known_score", "FP32", ["-1"])]
    assert triton.get_model_metadata(MODELS[1], as_json=True)["platform"] == "pytorch_libtorch"
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("no_such_model")
    assert "Request for unknown model: 'no_such_model' is not found" in info.value.message()
    assert info.value.status() == "StatusCode.NOT_FOUND"


def _inputs(images: np.ndarray):
    tensor = tc.InferInput("image", [len(images), 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images.reshape(-1, 1, 28, 28))
    return [tensor]


@pytest.mark.parametrize("model, kind", [(MODELS[0], "onnx"), (MODELS[1], "torchscript")])
def test_infer_matches_the_in_process_graph(triton, digits, model_repository, helpers, model, kind):
    images, _ = digits
    logits, embedding = helpers.reference_outputs(model_repository, kind, images)
    result = triton.infer(model, _inputs(images), request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedding, atol=1e-5, rtol=1e-5)
    response = result.get_response()
    assert response.id == "req-7" and response.model_name == model and response.model_version == "1"
    subset = triton.infer(model, _inputs(images[:3]), outputs=[tc.InferRequestedOutput("embedding")])
    assert subset.as_numpy("logits") is None
    np.testing.assert_allclose(subset.as_numpy("embedding"), embedding[:3], atol=1e-5, rtol=1e-5)


def test_async_infer(triton, digits, model_repository, helpers):
    images, _ = digits
    logits, _ = helpers.reference_outputs(model_repository, "onnx", images[:4])
    done: queue.Queue = queue.Queue()
    triton.async_infer(MODELS[0], _inputs(images[:4]), callback=lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    assert error is None
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)


def _request(images: np.ndarray, datatype="UINT8", shape=None, raw=None, model=MODELS[0], outputs=()):
    request = triton_pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype=datatype, shape=list(shape or (len(images), 1, 28, 28)))
    request.raw_input_contents.append(images.tobytes() if raw is None else raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize("change, code, text", [
    (dict(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "expects 'UINT8'"),
    (dict(shape=(4, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape"),
    (dict(raw=bytes(100)), grpc.StatusCode.INVALID_ARGUMENT, "needs 3136 bytes"),
    (dict(outputs=("probabilities",)), grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference output"),
    (dict(model="no_such_model"), grpc.StatusCode.NOT_FOUND, "Request for unknown model"),
    (dict(shape=(65, 1, 28, 28), raw=bytes(65 * 784)), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 64"),
    (dict(shape=(0, 1, 28, 28), raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape"),
    (dict(shape=(4, 1, 28, 29), raw=bytes(4 * 28 * 29)), grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape"),
    (dict(shape=(4, 1, 28, 28), raw=bytes(4 * 784 + 1)), grpc.StatusCode.INVALID_ARGUMENT, "needs 3136 bytes"),
])
def test_bad_infer_requests(raw_stub, triton, digits, change, code, text):
    with pytest.raises(grpc.RpcError) as info:
        raw_stub.ModelInfer(_request(digits[0][:4], **change), timeout=10)
    assert info.value.code() == code and text in info.value.details()
    assert triton.infer(MODELS[0], _inputs(digits[0][:2])).as_numpy("logits").shape == (2, 10)


def test_outputs_come_in_each_requests_own_order(raw_stub, digits):
    """Requested outputs are looked up once per combination (serving.core.inference caches them) and each answer is
    copied from a template per model, outputs and batch size (serving.grpc.kserve): each order, subset, batch size
    and id still gets its own answer, and an unknown name is refused every time, not remembered as valid."""
    for n, outputs, request_id in [(3, ("embedding", "logits"), "a"), (3, ("logits", "embedding"), ""),
                                   (3, ("logits",), "b"), (5, ("logits",), ""), (3, ("embedding", "logits"), "c")]:
        request = _request(digits[0][:n], outputs=outputs)
        request.id = request_id
        response = raw_stub.ModelInfer(request, timeout=10)
        assert [o.name for o in response.outputs] == list(outputs) and response.id == request_id
        assert [list(o.shape) for o in response.outputs] == [[n, 10] if o == "logits" else [n, 128] for o in outputs]
        assert [len(raw) for raw in response.raw_output_contents] == [4 * s[0] * s[1] for s in
                                                                       (o.shape for o in response.outputs)]
        assert response.model_name == MODELS[0] and response.model_version == "1"
    images = digits[0][:3]
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            raw_stub.ModelInfer(_request(images, outputs=("logits", "nope")), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_typed_contents_and_version(raw_stub, digits, model_repository, helpers):
    images = digits[0][:2]
    logits, _ = helpers.reference_outputs(model_repository, "onnx", images)
    request = triton_pb.ModelInferRequest(model_name=MODELS[0], model_version="1")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[2, 1, 28, 28])
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = raw_stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["logits", "embedding", "known_score"]
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10), logits, atol=1e-5)
    request.model_version = "2"
    with pytest.raises(grpc.RpcError) as info:
        raw_stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_typed_api_serves_onnx_by_default_when_all_models_load(all_models_server):
    with grpc.insecure_channel(all_models_server.address) as channel:
        info = pb_grpc.DigitServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_name == MODELS[0]
    assert all_models_server.wait_for("ready")["models"] == list(MODELS)


def test_model_config_is_tritons_as_this_server_runs_it(triton):
    config = triton.get_model_config(MODELS[0], as_json=True)["config"]
    assert config["name"] == MODELS[0] and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime" and config["max_batch_size"] == 256
    assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": ["1", "28", "28"]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", ["10"]), ("embedding", "TYPE_FP32", ["128"]), ("known_score", "TYPE_FP32", ["1"])]
    assert "reshape" not in config["output"][0] and config["output"][2]["reshape"] == {}  # [batch] in the graph
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == "200"
    assert batching["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"] == [{"name": f"{MODELS[0]}_0", "kind": "KIND_CPU", "count": 1}]
    assert config["default_model_filename"] == "model.onnx"
    assert triton.get_model_config(MODELS[1], as_json=True)["config"]["platform"] == "pytorch_libtorch"
    assert "model_configuration" in triton.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_config("no_such_model")
    assert "Request for unknown model: 'no_such_model' is not found" in info.value.message()


def test_metrics_count_each_model_separately(all_models_server, triton, digits, helpers):
    before = helpers.scrape(all_models_server)
    for model in MODELS:
        triton.infer(model, _inputs(digits[0][:3]))
    with pytest.raises(InferenceServerException):
        triton.infer(MODELS[1], _inputs(digits[0][:3]), outputs=[tc.InferRequestedOutput("nope")])
    after = helpers.scrape(all_models_server)

    def delta(name, model, **labels):
        return (helpers.metric(after, name, model=model, version="1", **labels)
                - helpers.metric(before, name, model=model, version="1", **labels))

    for model in MODELS:
        assert delta("nv_inference_request_success", model) == 1
        assert delta("nv_inference_count", model) == 3 and delta("nv_inference_exec_count", model) == 1
    assert delta("nv_inference_request_failure", MODELS[1], reason="OTHER") == 1
    assert delta("nv_inference_request_failure", MODELS[0]) == 0
