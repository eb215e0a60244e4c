"""INT8 export: `--int8` adds a quantised ONNX model verified against the FP32 one, refuses to calibrate
without held-out images, fails (leaving nothing) when the INT8 graph breaks a bound, and the server loads it.
The default suite runs the whole path once on the random tiny checkpoint with the bounds lifted (its near-tied
logits flip under any rounding); the bounds themselves are checked on a briefly trained checkpoint (slow)."""

import json

import numpy as np
import pytest
import torch

from export.repository import ExportError, export_repository
from serving.repository.format import ONNX_INT8_MODEL
from support import synthetic_digits
from training.data import sha256_file

ONNX_DIR = "lsoftmax_mnist_onnx"


def _digits(n, seed):
    images, labels = synthetic_digits(n, seed)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_mnist_root, tmp_path_factory):
    """A fast net trained for 18 iterations on the synthetic digits, 128 of its 512 training images held out: a
    random net's near-tied logits would flip under any quantisation; this one's do not, like a real model's. On
    digits alone (the fast recipe now trains beside negatives: with them this tiny net's max_cosine scores crowd
    its threshold, and 3 of the 128 test decisions flip under quantisation at either graph's threshold)."""
    from training.train import main

    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--data-dir", str(tiny_mnist_root), "--out", str(out), "--device", "cpu", "--progress", "off",
                     "--model", "fast", "--margin", "2", "--epochs", "3", "--batch-size", "64", "--val-size", "128",
                     "--test-subset", "128", "--seed", "3", "--negatives", "off", "--capture-augment", "off"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "last.pt"


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory, trained_checkpoint, tiny_mnist_root):
    """Calibrated on the checkpoint's 128 held-out training images, verified on 128 synthetic test digits. max_cosine:
    Mahalanobis statistics fitted on 64 synthetic images put most digits at the threshold, where any rounding flips
    the decision (the real m=4 model's multilayer_mahalanobis decisions agree on 99.61%, BENCHMARKS.md)."""
    images, labels = _digits(128, 5)
    out = tmp_path_factory.mktemp("int8") / "repo"
    lines = []
    manifest = export_repository(trained_checkpoint, out, images=images, labels=labels, data_dir=tiny_mnist_root,
                                 detector="max_cosine", int8=True, log=lines.append)
    return out, manifest, images, lines


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_int8_model_is_written_listed_and_recorded(int8_repo):
    out, manifest, _, lines = int8_repo
    model = out / ONNX_INT8_MODEL / "1" / "model.onnx"
    assert manifest["models"][ONNX_INT8_MODEL] == {"backend": "onnxruntime", "file": f"{ONNX_INT8_MODEL}/1/model.onnx",
                                                   "sha256": sha256_file(model)}
    assert json.loads((out / "manifest.json").read_text())["models"] == manifest["models"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files and all(sha256_file(out / rel) == sha for rel, sha in manifest["files"].items())
    record = manifest["int8"]
    assert record["format"] == "QDQ" and record["calibrated_on"]["images"] == 128
    assert record["calibrated_on"]["source"] == "held-out training images"
    check = record["verification"]
    assert check["images"] == 128 and check["top1_agreement"] >= 99.8 and check["embedding_cosine_mean"] >= 0.995
    assert set(check["accuracy"]) == {"fp32", "int8"} and check["known_score_max_abs_diff"] is not None
    assert check["decision_agreement"] is not None  # fitted: the manifest has a threshold
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Max", "MaxPool"} <= set(record["op_types"])
    assert "PRelu" not in record["op_types"] and record["activations"].startswith("uint8")
    assert any(line.startswith(f"int8: {ONNX_INT8_MODEL}") for line in lines)


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_int8_quantises_the_convs_but_the_image_facing_one(int8_repo):
    import onnx

    out, manifest, _, _ = int8_repo
    fp32 = onnx.load(str(out / ONNX_DIR / "1" / "model.onnx"))
    convs = [n.name for n in fp32.graph.node if n.op_type == "Conv"]
    assert manifest["int8"]["quantized_nodes"] == convs[1:]
    int8 = onnx.load(str(out / ONNX_INT8_MODEL / "1" / "model.onnx"))
    fed_by_dq = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.name for n in int8.graph.node if n.op_type == "Conv" and n.input[0] in fed_by_dq}
    assert quantized == set(convs[1:])
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("embedding", "logits") for n in int8.graph.node)


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_int8_config_pbtxt_is_the_fp32_ones_under_its_own_name(int8_repo):
    """... with its own fitted temperature and threshold as parameters."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, manifest, _, _ = int8_repo
    fp32 = text_format.Parse((out / ONNX_DIR / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    int8 = text_format.Parse((out / ONNX_INT8_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert int8.name == ONNX_INT8_MODEL and int8.backend == "onnxruntime"
    own = manifest["model_calibration"][ONNX_INT8_MODEL]
    assert float(int8.parameters["threshold"].string_value) == own["open_set"]["threshold"]
    assert float(int8.parameters["temperature"].string_value) == own["calibration"]["temperature"]
    for key in ("temperature", "threshold"):
        int8.parameters[key].string_value = fp32.parameters[key].string_value
    int8.name = fp32.name
    assert int8 == fp32


def test_without_int8_the_repository_has_no_int8_model(tmp_path, tiny_checkpoint):
    images, labels = _digits(16, 2)
    manifest = export_repository(tiny_checkpoint, tmp_path / "repo", images=images, labels=labels,
                                 fit_images=images, fit_labels=labels, detector="max_cosine", log=lambda *_: None)
    assert "int8" not in manifest and sorted(manifest["models"]) == [ONNX_DIR, "lsoftmax_mnist_torchscript"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [ONNX_DIR, "lsoftmax_mnist_torchscript",
                                                                     "manifest.json"]


def test_int8_without_held_out_images_is_refused_before_any_work(tmp_path, tiny_checkpoint):
    images, labels = _digits(16, 2)
    with pytest.raises(ExportError, match="held-out images to calibrate the INT8 model.*--fit-on-training-images"):
        export_repository(tiny_checkpoint, tmp_path / "repo", images=images, labels=labels, int8=True,
                          log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_a_broken_int8_model_fails_the_export_and_leaves_nothing(tmp_path, trained_checkpoint, tiny_mnist_root,
                                                                  monkeypatch):
    """The quantiser's output with its second conv's int8 weights scrambled: verification names the broken
    bounds, and the half-built repository is removed."""
    import onnx
    from onnx import numpy_helper

    import export.quantize as quantize

    real = quantize.quantize

    def damaged(fp32_path, int8_path, calibration_images):
        nodes = real(fp32_path, int8_path, calibration_images)
        model = onnx.load(str(int8_path))
        weights = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8
                   and len(init.dims) == 4]
        array = numpy_helper.to_array(weights[0])
        weights[0].CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(array.ravel())
                                                    .reshape(array.shape), weights[0].name))
        onnx.save(model, str(int8_path))
        return nodes

    monkeypatch.setattr(quantize, "quantize", damaged)
    images, labels = _digits(128, 5)
    with pytest.raises(ExportError, match="INT8 graph fails verification: .*(top-1 agreement|embedding cosine)"):
        export_repository(trained_checkpoint, tmp_path / "repo", images=images, labels=labels,
                          data_dir=tiny_mnist_root, int8=True, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_int8_problems_name_each_broken_bound():
    from export.quantize import int8_problems

    good = {"top1_agreement": 100.0, "accuracy": {"fp32": 99.27, "int8": 99.2}, "embedding_cosine_mean": 0.9999,
            "decision_agreement": 99.9, "threshold": -237.0}
    assert int8_problems(good) == []
    bad = {**good, "top1_agreement": 99.7, "accuracy": {"fp32": 99.27, "int8": 99.1},
           "embedding_cosine_mean": float("nan"), "decision_agreement": 98.0}
    problems = int8_problems(bad)
    assert len(problems) == 4 and "top-1" in problems[0] and "accuracy" in problems[1]
    assert "cosine" in problems[2] and "accept/reject" in problems[3]


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_the_server_loads_and_serves_the_int8_model_by_name(int8_repo):
    """serving's own path: the manifest's model by name (--model), the onnx backend, the graph's three outputs;
    Manifest.select without a precision stays the FP32 one (the server's --precision picks INT8 on the CPU:
    tests/serving/test_serving_precision.py)."""
    from serving.backends import load_backend
    from serving.repository.reader import read_manifest, verify_sha256

    out, _, images, _ = int8_repo
    manifest = read_manifest(out)
    entry = manifest.select(model=ONNX_INT8_MODEL)
    verify_sha256(entry)
    assert (entry.kind, entry.backend, entry.path) == ("onnx", "onnxruntime", out / ONNX_INT8_MODEL / "1" / "model.onnx")
    assert manifest.select().name == manifest.select(backend="onnx").name == ONNX_DIR
    assert [e.name for e in manifest.served()] == sorted([ONNX_DIR, ONNX_INT8_MODEL, "lsoftmax_mnist_torchscript"])
    backend = load_backend(entry.kind, entry.path, "cpu", input_name=manifest.input_name)
    try:
        logits, embedding, known = backend.infer(images[:8].numpy())
        assert logits.shape == (8, 10) and embedding.shape == (8, 128) and known.shape == (8,)
        fp32 = load_backend("onnx", out / ONNX_DIR / "1" / "model.onnx", "cpu").infer(images[:8].numpy())
        assert (logits.argmax(1) == fp32[0].argmax(1)).all()
    finally:
        backend.close()


def test_int8_export_end_to_end_on_the_tiny_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    """Fast: quantise, verify (bounds lifted), lay out, list in the manifest, load through serving by name."""
    import export.quantize as quantize
    from serving.backends import load_backend
    from serving.repository.reader import read_manifest, verify_sha256

    for key, loose in (("min_top1_agreement", 0.0), ("max_accuracy_drop", 100.0), ("min_embedding_cosine", -1.0),
                       ("min_decision_agreement", 0.0)):
        monkeypatch.setitem(quantize.BOUNDS, key, loose)
    images, labels = _digits(32, 5)
    out = tmp_path / "repo"
    manifest = export_repository(tiny_checkpoint, out, images=images, labels=labels, fit_images=images,
                                 fit_labels=labels, detector="max_cosine", int8=True, log=lambda *_: None)
    assert manifest["models"][ONNX_INT8_MODEL]["sha256"] == sha256_file(out / ONNX_INT8_MODEL / "1" / "model.onnx")
    assert manifest["int8"]["verification"]["images"] == 32 and len(manifest["int8"]["quantized_nodes"]) == 4
    assert _optimised_op_counts(out / ONNX_INT8_MODEL / "1" / "model.onnx")["QLinearConv"] == 4
    assert (out / ONNX_INT8_MODEL / "config.pbtxt").is_file()
    repository = read_manifest(out)
    entry = repository.select(model=ONNX_INT8_MODEL)
    verify_sha256(entry)
    assert repository.select().name == ONNX_DIR  # FP32 stays the default model
    backend = load_backend(entry.kind, entry.path, "cpu", input_name=repository.input_name)
    try:
        assert [a.shape for a in backend.infer(images[:4].numpy())] == [(4, 10), (4, 128), (4,)]
    finally:
        backend.close()


def _optimised_op_counts(path):
    """Op types of the graph onnxruntime actually runs (its optimised graph, written out)."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = f"{tmp}/optimised.onnx"
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.slow  # a trained checkpoint and real exports: ~35 s on 2 shared cores
def test_onnxruntime_fuses_every_quantised_conv(int8_repo):
    """The speed comes from here (BENCHMARKS.md): every quantised Conv becomes a QLinearConv, the pools run on
    uint8, and no float Conv is left between Q/DQ pairs, nor a PRelu."""
    out, manifest, _, _ = int8_repo
    ops = _optimised_op_counts(out / ONNX_INT8_MODEL / "1" / "model.onnx")
    assert ops["QLinearConv"] == len(manifest["int8"]["quantized_nodes"]) == 4
    # float: the image-facing conv, and the copy of it onnxruntime folds the first Max(x, a*x)'s Mul into
    assert ops["Conv"] <= 2 and ops["PRelu"] == 0 and ops["NhwcMaxPool"] >= 2


def test_prelu_as_max_is_exact_and_keeps_slopes_above_one():
    """Max(x, a*x) == PRelu(x, a) bit for bit for slopes <= 1 (negative ones too); a slope > 1 keeps the PRelu."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import prelu_as_max

    rng = np.random.default_rng(0)
    slopes = {"a": np.array([-0.4, 0.0, 0.25, 1.0], np.float32).reshape(4, 1, 1),
              "b": np.array([0.1, 1.5, 0.2, 0.3], np.float32).reshape(4, 1, 1)}
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "a"], ["h"], name="p1"), helper.make_node("PRelu", ["h", "b"], ["y"], name="p2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4, 5, 5])],
        [numpy_helper.from_array(v, k) for k, v in slopes.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewritten = prelu_as_max(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Mul", "Max", "PRelu"]
    x = (rng.standard_normal((2, 4, 5, 5)) * 10).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for want, got in zip(run(model), run(rewritten)):
        np.testing.assert_array_equal(want, got)
    onnx.checker.check_model(rewritten)
