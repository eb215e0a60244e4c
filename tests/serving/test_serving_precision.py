"""Which model the typed API serves by precision: under --precision auto a repository with the INT8 model
serves it where ONNX runs on the CPU and FP32 on CUDA; fp32 / int8 force either; contradicting flags are usage
errors and int8 without the model a clear startup error. The INT8 model answers with its own temperature and
threshold (manifest.json model_calibration) and backend calls of at most 32 images, GetModelInfo and GET /v1/model
say which model and precision run, and a repository exported before INT8 had its own fit still serves, saying its
calibration is the FP32 one.
Run: .venv/bin/python -m pytest tests/serving/test_serving_precision.py -q"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

import serving.precision as precision
from serving.core.errors import StartupError, UsageError
from serving.precision import INT8_MAX_BATCH_SIZE, choose_precision, default_max_batch_size
from serving.repository.format import MODEL_CALIBRATION, ONNX_INT8_MODEL
from serving.repository.reader import read_manifest
from support import synthetic_digits

ONNX_DIR = "lsoftmax_mnist_onnx"
LOOSE = {"min_top1_agreement": 0.0, "max_accuracy_drop": 100.0, "min_embedding_cosine": -1.0,
         "min_decision_agreement": 0.0}


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory, tiny_checkpoint):
    """An --int8 export of the tiny checkpoint, fitted on 120 synthetic digits (INT8 bounds lifted: its random
    weights' near-tied logits flip under any rounding)."""
    import torch

    import export.quantize as quantize
    from export.repository import export_repository

    x, y = synthetic_digits(120, 7)
    fit_x, fit_y = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()
    out = tmp_path_factory.mktemp("precision") / "repo"
    with pytest.MonkeyPatch.context() as patch:
        for key, loose in LOOSE.items():
            patch.setitem(quantize.BOUNDS, key, loose)
        export_repository(tiny_checkpoint, out, images=fit_x[:32], labels=fit_y[:32], fit_images=fit_x,
                          fit_labels=fit_y, detector="mahalanobis", int8=True, log=lambda *_: None)
    return out


def _edited_copy(repository, tmp_path, edit):
    """A copy of the repository with manifest.json edited (it lists no digest of itself)."""
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    manifest = json.loads((repo / "manifest.json").read_text())
    edit(manifest)
    (repo / "manifest.json").write_text(json.dumps(manifest))
    return repo


def _without_own_calibration(manifest):
    del manifest[MODEL_CALIBRATION]


def _on(monkeypatch, device):
    monkeypatch.setattr(precision, "onnx_device", lambda requested: device)


# ------------------------------------------------------------------------------------------- the choice


def test_auto_serves_int8_on_the_cpu_and_fp32_on_cuda(int8_repository, monkeypatch):
    manifest = read_manifest(int8_repository)
    _on(monkeypatch, "cpu")
    assert choose_precision("auto", manifest, None, None, "auto") == "int8"
    assert manifest.select(None, None, "int8").name == ONNX_INT8_MODEL
    # --backend onnx: both ONNX models (KServe clients keep the FP32 one by name), the typed API serves INT8
    assert [e.name for e in manifest.served(None, "onnx", "int8")] == [ONNX_DIR, ONNX_INT8_MODEL]
    assert len(manifest.served(None, None, "int8")) == 3  # without flags every model is loaded (KServe)
    assert choose_precision("fp32", manifest, None, None, "auto") == "fp32"
    _on(monkeypatch, "cuda")
    assert choose_precision("auto", manifest, None, None, "auto") == "fp32"
    assert manifest.select(None, None, "fp32").name == ONNX_DIR
    assert choose_precision("int8", manifest, None, None, "auto") == "int8"  # forced: on CUDA too


def test_onnx_runs_on_the_cpu_when_asked_or_without_a_gpu(monkeypatch):
    assert precision.onnx_device("cpu") == "cpu"
    monkeypatch.setattr(precision, "resolve_device", lambda requested: "cpu")
    assert precision.onnx_device("auto") == "cpu"


def test_a_repository_without_int8_serves_fp32_and_refuses_forced_int8(model_repository, monkeypatch):
    manifest = read_manifest(model_repository)
    _on(monkeypatch, "cpu")
    assert choose_precision("auto", manifest, None, None, "auto") == "fp32"
    assert manifest.select(None, None, "fp32").name == ONNX_DIR
    with pytest.raises(StartupError, match=r"--precision int8: .*manifest.json has no INT8 model "
                                           r"\(lsoftmax_mnist_onnx_int8\); export with .*--int8"):
        choose_precision("int8", manifest, None, None, "auto")


@pytest.mark.parametrize("requested, model, backend, message", [
    ("int8", ONNX_DIR, None, "--model lsoftmax_mnist_onnx is an FP32 model but --precision int8 was given"),
    ("fp32", ONNX_INT8_MODEL, None, "is an INT8 model but --precision fp32"),
    ("int8", None, "torchscript", "--backend torchscript has only FP32"),
])
def test_flags_that_contradict_the_precision_are_usage_errors(int8_repository, requested, model, backend, message):
    with pytest.raises(UsageError, match=message):
        choose_precision(requested, read_manifest(int8_repository), model, backend, "cpu")


def test_model_and_torchscript_decide_without_a_precision(int8_repository):
    manifest = read_manifest(int8_repository)
    assert choose_precision("auto", manifest, ONNX_DIR, None, "cpu") is None
    assert choose_precision("int8", manifest, ONNX_INT8_MODEL, None, "cpu") is None
    assert choose_precision("auto", manifest, None, "torchscript", "cpu") is None


def test_the_int8_model_takes_smaller_backend_batches(int8_repository):
    manifest = read_manifest(int8_repository)
    assert default_max_batch_size(manifest.models[ONNX_INT8_MODEL], 256) == INT8_MAX_BATCH_SIZE == 32
    assert default_max_batch_size(manifest.models[ONNX_INT8_MODEL], 8) == 8  # never above its config's
    assert default_max_batch_size(manifest.models[ONNX_DIR], 256) == 256


# ------------------------------------------------------------------------------------------ calibration


def test_each_model_has_the_calibration_of_its_own_graph(int8_repository):
    raw = json.loads((int8_repository / "manifest.json").read_text())
    manifest = read_manifest(int8_repository)
    own = raw[MODEL_CALIBRATION][ONNX_INT8_MODEL]
    int8 = manifest.calibration(ONNX_INT8_MODEL)
    assert (int8.temperature, int8.threshold, int8.precision) == (
        own["calibration"]["temperature"], own["open_set"]["threshold"], "int8")
    for name in (ONNX_DIR, "lsoftmax_mnist_torchscript"):
        fp32 = manifest.calibration(name)
        assert (fp32.temperature, fp32.threshold, fp32.detector, fp32.precision) == (
            raw["calibration"]["temperature"], raw["open_set"]["threshold"], "mahalanobis", "fp32")
    assert int8.temperature != manifest.calibration(ONNX_DIR).temperature


def test_an_old_repository_gives_int8_the_fp32_calibration(int8_repository, tmp_path):
    manifest = read_manifest(_edited_copy(int8_repository, tmp_path, _without_own_calibration))
    assert manifest.calibration(ONNX_INT8_MODEL) == manifest.calibration(ONNX_DIR)
    assert manifest.calibration(ONNX_INT8_MODEL).precision == "fp32"


def test_an_unfitted_repository_has_no_calibrated_precision(model_repository):
    calibration = read_manifest(model_repository).calibration(ONNX_DIR)
    assert (calibration.temperature, calibration.threshold, calibration.precision) == (1.0, None, "")


def _set(path, value):
    def edit(manifest):
        *parents, last = path
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set([MODEL_CALIBRATION], []), "model_calibration: expected an object, got list"),
    (_set([MODEL_CALIBRATION, "lsoftmax_mnist_pt"], {"calibration": {"temperature": 1.0}}),
     "model_calibration.lsoftmax_mnist_pt: names no model of the repository"),
    (_set([MODEL_CALIBRATION, ONNX_INT8_MODEL, "calibration", "temperature"], 0),
     "model_calibration.lsoftmax_mnist_onnx_int8.calibration.temperature: expected a positive number, got 0"),
    (_set([MODEL_CALIBRATION, ONNX_INT8_MODEL, "open_set", "threshold"], "low"),
     "model_calibration.lsoftmax_mnist_onnx_int8.open_set.threshold: expected a number or null, got 'low'"),
    (_set([MODEL_CALIBRATION, ONNX_INT8_MODEL], {"open_set": {}}),
     "model_calibration.lsoftmax_mnist_onnx_int8.calibration: expected an object"),
])
def test_a_defective_model_calibration_stops_the_server_naming_the_key(int8_repository, tmp_path, edit, message):
    with pytest.raises(StartupError, match="manifest.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(_edited_copy(int8_repository, tmp_path, edit))


# ----------------------------------------------------------------------------------------- the server


def _int8_outputs(repository, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(repository / ONNX_INT8_MODEL / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits", "known_score"], {"image": images.reshape(-1, 1, 28, 28)})


def _http_model(server):
    port = server.wait_for("listening")["http_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=10) as reply:
        return json.loads(reply.read())


def test_the_server_serves_int8_on_the_cpu_with_its_own_temperature_and_threshold(int8_repository, helpers,
                                                                                   tmp_path):
    """INT8's threshold moved to the median of its scores on the test digits and FP32's to one that accepts
    everything: half the digits rejected means the INT8 threshold decides; the probabilities follow INT8's
    temperature."""
    from serving.client import Client

    images, _ = synthetic_digits(16, 21)
    logits, known = _int8_outputs(int8_repository, images)
    median = float(np.median(known))

    def edit(manifest):
        manifest["open_set"]["threshold"] = -1e30
        manifest[MODEL_CALIBRATION][ONNX_INT8_MODEL]["open_set"]["threshold"] = median

    repo = _edited_copy(int8_repository, tmp_path, edit)
    temperature = json.loads((repo / "manifest.json").read_text())[MODEL_CALIBRATION][ONNX_INT8_MODEL][
        "calibration"]["temperature"]
    with helpers.ServerProcess(repo, "--backend", "onnx", "--device", "cpu").start() as server:
        with Client(server.address) as client:
            info = client.info()
            results = client.classify(images)  # a uint8 array: raw pixels, fed as they are
        http_info = _http_model(server)
    assert (info["model_name"], info["precision"], info["calibrated_precision"]) == (ONNX_INT8_MODEL, "int8", "int8")
    assert (info["temperature"], info["known_score_threshold"]) == (temperature, median)
    assert info["max_batch_size"] == INT8_MAX_BATCH_SIZE  # its backend calls, without --max-batch-size
    assert (http_info["modelName"], http_info["precision"], http_info["calibratedPrecision"]) == (
        ONNX_INT8_MODEL, "int8", "int8")
    assert [r.rejected for r in results] == list(known < median) and 0 < sum(known < median) < len(images)
    probabilities = helpers.softmax(logits / np.float32(temperature))
    np.testing.assert_allclose([r.probability for r in results], probabilities.max(1), rtol=1e-4, atol=1e-6)
    assert server.wait_for("listening")["models"] == [ONNX_DIR, ONNX_INT8_MODEL]  # KServe keeps FP32 by name
    record = server.wait_for("typed_model")
    assert (record["model"], record["precision"], record["requested_precision"]) == (ONNX_INT8_MODEL, "int8", "auto")


def test_forced_fp32_serves_the_fp32_model_with_its_calibration(int8_repository, helpers):
    from serving.client import Client

    manifest = json.loads((int8_repository / "manifest.json").read_text())
    with helpers.ServerProcess(int8_repository, "--backend", "onnx", "--device", "cpu", "--precision",
                               "fp32").start() as server:
        with Client(server.address) as client:
            info = client.info()
    assert (info["model_name"], info["precision"], info["calibrated_precision"]) == (ONNX_DIR, "fp32", "fp32")
    assert (info["temperature"], info["known_score_threshold"]) == (manifest["calibration"]["temperature"],
                                                                   manifest["open_set"]["threshold"])
    assert info["max_batch_size"] == manifest["max_batch_size"] == 256


def test_an_old_repository_still_serves_int8_and_says_its_calibration_is_fp32s(int8_repository, helpers, tmp_path):
    from serving.client import Client

    repo = _edited_copy(int8_repository, tmp_path, _without_own_calibration)
    manifest = json.loads((repo / "manifest.json").read_text())
    with helpers.ServerProcess(repo, "--backend", "onnx", "--device", "cpu").start() as server:
        with Client(server.address) as client:
            info = client.info()
        warning = server.wait_for("calibration_not_own")
    assert (info["model_name"], info["precision"], info["calibrated_precision"]) == (ONNX_INT8_MODEL, "int8", "fp32")
    assert info["temperature"] == manifest["calibration"]["temperature"]
    assert (warning["level"], warning["calibrated_precision"]) == ("warning", "fp32") and "--int8" in warning["detail"]


def test_forced_int8_without_the_int8_model_stops_the_server(model_repository, helpers):
    result = subprocess.run([sys.executable, "-m", "serving", "--model-repository", str(model_repository),
                             "--precision", "int8", "--port", "0", "--http-port", "-1", "--metrics-port", "-1",
                             "--log-format", "text"], cwd=helpers.PROJECT_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "has no INT8 model (lsoftmax_mnist_onnx_int8)" in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stderr
