"""The INT8 model's own calibration: export fits its temperature and known_score threshold on the same
held-out digits and the same threshold rows as the FP32 fit, records them where the server reads them
(manifest.json model_calibration, the INT8 config.pbtxt's parameters), and reports INT8 against FP32 each at its own
threshold. On the random tiny checkpoint with the INT8 bounds lifted (its near-tied logits flip under any rounding;
tests/export/test_int8.py checks the bounds on a trained one)."""

import json

import numpy as np
import pytest
import torch

import export.quantize as quantize
from export import open_set
from export.detectors import THRESHOLD, get
from export.int8_fit import fit_int8
from export.repository import export_repository
from serving.repository.config import read_config
from serving.repository.format import MODEL_CALIBRATION, ONNX_INT8_MODEL
from support import synthetic_digits

ONNX_DIR = "lsoftmax_mnist_onnx"
DETECTOR = "mahalanobis"  # split (stats, threshold): the threshold rows are every other held-out row
LOOSE = {"min_top1_agreement": 0.0, "max_accuracy_drop": 100.0, "min_embedding_cosine": -1.0,
         "min_decision_agreement": 0.0}


def _digits(n, seed):
    images, labels = synthetic_digits(n, seed)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    """An --int8 export fitted on 120 held-out digits (60 threshold rows), verified on 48 others."""
    fit_x, fit_y = _digits(120, 7)
    images, labels = _digits(48, 8)
    out = tmp_path_factory.mktemp("int8_fit") / "repo"
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        for key, loose in LOOSE.items():
            patch.setitem(quantize.BOUNDS, key, loose)
        manifest = export_repository(tiny_checkpoint, out, images=images, labels=labels, fit_images=fit_x,
                                     fit_labels=fit_y, detector=DETECTOR, int8=True, log=lines.append)
    return out, manifest, fit_x.numpy(), fit_y.numpy(), images.numpy(), lines


def _outputs(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits", "known_score"], {"image": images})


def test_the_int8_fit_uses_the_fp32_fits_images_and_threshold_rows(exported):
    out, manifest, fit_x, fit_y, _, _ = exported
    rows = get(DETECTOR).split_rows(len(fit_y))[THRESHOLD]
    fp32 = manifest["open_set"]
    assert fp32["threshold_images"] == len(rows) == 60
    # the rows are the FP32 fit's own: its threshold comes back from the FP32 graph's scores on them
    _, fp32_known = _outputs(out / ONNX_DIR / "1" / "model.onnx", fit_x)
    assert open_set.accept_threshold(fp32_known[rows], fp32["accept_rate"]) == pytest.approx(fp32["threshold"],
                                                                                             rel=1e-4, abs=1e-4)
    own = manifest[MODEL_CALIBRATION][ONNX_INT8_MODEL]
    logits, known = _outputs(out / ONNX_INT8_MODEL / "1" / "model.onnx", fit_x)
    assert own["precision"] == "int8"
    assert own["calibration"]["temperature"] == pytest.approx(open_set.fit_temperature(logits, fit_y), rel=1e-6)
    assert own["open_set"]["threshold"] == open_set.accept_threshold(known[rows], fp32["accept_rate"])
    assert own["open_set"]["threshold_images"] == 60 and own["open_set"]["detector"] == DETECTOR
    assert own["open_set"]["fit_accepted"] >= fp32["accept_rate"]
    assert own["calibration"]["fitted_on"] == manifest["calibration"]["fitted_on"]
    assert own["calibration"]["nll_after"] <= own["calibration"]["nll_before"] + 1e-9


def test_the_int8_config_pbtxt_carries_its_own_fitted_parameters(exported):
    out, manifest, _, _, _, _ = exported
    own = manifest[MODEL_CALIBRATION][ONNX_INT8_MODEL]
    int8 = read_config(out / ONNX_INT8_MODEL / "config.pbtxt")
    fp32 = read_config(out / ONNX_DIR / "config.pbtxt")
    assert float(int8.parameters["temperature"].string_value) == own["calibration"]["temperature"]
    assert float(int8.parameters["threshold"].string_value) == own["open_set"]["threshold"]
    assert float(fp32.parameters["threshold"].string_value) == manifest["open_set"]["threshold"]
    for key in ("temperature", "threshold", "detector"):
        int8.parameters[key].string_value = fp32.parameters[key].string_value
    int8.name = fp32.name
    assert int8 == fp32  # otherwise the FP32 model's config under its own name


def test_the_export_reports_int8_against_fp32_each_at_its_own_threshold(exported):
    out, manifest, _, _, images, lines = exported
    check = manifest["int8"]["verification"]
    fp32_known = _outputs(out / ONNX_DIR / "1" / "model.onnx", images)[1]
    int8_known = _outputs(out / ONNX_INT8_MODEL / "1" / "model.onnx", images)[1]
    fp32_accepts = fp32_known >= manifest["open_set"]["threshold"]
    int8_accepts = int8_known >= manifest[MODEL_CALIBRATION][ONNX_INT8_MODEL]["open_set"]["threshold"]
    assert check["int8_threshold"] == manifest[MODEL_CALIBRATION][ONNX_INT8_MODEL]["open_set"]["threshold"]
    assert check["decision_agreement"] == pytest.approx(100 * (fp32_accepts == int8_accepts).mean())
    assert check["accepted"] == pytest.approx({"fp32": 100 * fp32_accepts.mean(), "int8": 100 * int8_accepts.mean()})
    assert check["decision_agreement_at_fp32_threshold"] is not None and set(check["accuracy"]) == {"fp32", "int8"}
    report = [line for line in lines if line.startswith("int8: own fit")]
    assert len(report) == 1 and "at each model's own threshold" in report[0] and "digits accepted FP32" in report[0]
    assert json.loads((out / "manifest.json").read_text())[MODEL_CALIBRATION] == manifest[MODEL_CALIBRATION]


def test_a_threshold_split_that_differs_from_the_fp32_fits_is_refused(exported):
    out, manifest, fit_x, fit_y, _, _ = exported
    fits = {"calibration": manifest["calibration"], "open_set": {**manifest["open_set"], "threshold_images": 59}}
    with pytest.raises(ValueError, match="deals 60 of 120 held-out images to its threshold part, the FP32 fit used 59"):
        fit_int8(out / ONNX_INT8_MODEL / "1" / "model.onnx", fit_x, fit_y, fits)


def test_the_problem_names_both_thresholds():
    record = {"top1_agreement": 100.0, "accuracy": None, "embedding_cosine_mean": 1.0, "decision_agreement": 98.0,
              "threshold": -9.5, "int8_threshold": -9.25}
    [problem] = quantize.int8_problems(record)
    assert "threshold -9.5 (INT8 at its own -9.25)" in problem and "98.00%" in problem
