"""The INT8 graph's own softmax temperature and known_score threshold, fitted as the FP32 graph's are.

Quantisation moves the logits and the known_score a little (BENCHMARKS.md, "INT8"), so the FP32 graph's
threshold would accept a different share of digits than `accept_rate` promises when the INT8 graph serves. The
same held-out digits and the same split rows as export.fitting: the temperature minimises NLL on all of them, the
threshold accepts `accept_rate` of the detector's THRESHOLD part, both from the INT8 graph's own outputs. The
detector's statistics are not refitted: the INT8 graph carries the FP32 graph's (known_score stays float), so only
where its scores fall moves. The result is manifest.json's `model_calibration.lsoftmax_mnist_onnx_int8`, which the
server reads (serving.repository.calibration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import open_set
from export.detectors import THRESHOLD, get
from export.fitting import calibration_record

__all__ = ["fit_int8"]


def _threshold_rows(fp32_open_set: dict, count: int) -> np.ndarray:
    """The held-out rows the FP32 threshold was picked on (the detector deals them the same way every time)."""
    rows = get(fp32_open_set["detector"]).split_rows(count)[THRESHOLD]
    expected = fp32_open_set.get("threshold_images")
    if expected is not None and expected != len(rows):
        raise ValueError(f"the {fp32_open_set['detector']} detector deals {len(rows)} of {count} held-out images to "
                         f"its threshold part, the FP32 fit used {expected}")
    return rows


def fit_int8(int8_path: Path, images: np.ndarray, labels: np.ndarray, fp32_fits: dict) -> dict:
    """{"precision", "calibration", "open_set"} for the INT8 graph at int8_path, fitted on the held-out images and
    labels the FP32 fits (fp32_fits: the manifest's calibration and open_set records) were fitted on."""
    from export.quantize import run_graph

    fp32_calibration, fp32_open_set = fp32_fits["calibration"], fp32_fits["open_set"]
    logits, _, known = run_graph(int8_path, images)
    labels = np.asarray(labels, np.int64)
    temperature = open_set.fit_temperature(logits, labels)
    calibration = calibration_record(logits, labels, temperature, fp32_calibration["fitted_on"])
    record = {key: fp32_open_set.get(key) for key in ("output", "detector", "accept_rate", "fitted_on", "description")}
    record["detector_fitted_on"] = "the FP32 graph's features (the INT8 graph computes known_score from them in float)"
    if fp32_open_set.get("threshold") is None:  # nothing fitted: nothing rejected, as for FP32
        return {"precision": "int8", "calibration": calibration, "open_set": {**record, "threshold": None}}
    rows = _threshold_rows(fp32_open_set, len(labels))
    threshold = open_set.accept_threshold(known[rows], fp32_open_set["accept_rate"])
    record.update(threshold=threshold, fit_accepted=float((known[rows] >= threshold).mean()),
                  threshold_images=len(rows))
    return {"precision": "int8", "calibration": calibration, "open_set": record}
