"""Each model's served calibration: the softmax temperature and the known_score threshold its answers use.

    calibration = model_calibration(spec, "lsoftmax_mnist_onnx_int8", source)   # StartupError on a defect
    calibration.temperature, calibration.threshold, calibration.detector, calibration.precision

The repository's `calibration` and `open_set` records were fitted on the FP32 graph (docs/architecture.md §5). A
model whose graph computes differently (the INT8 one) has its own, fitted on the same held-out digits, under
`model_calibration.<name>` (serving.repository.format.MODEL_CALIBRATION; repositories exported with INT8 calibration).
A model without its own entry uses the repository's, and `precision` then says which graph they were fitted on:
"fp32" for an INT8 model from an older repository, which the server reports rather than hides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.core.errors import StartupError
from serving.repository.format import MODEL_CALIBRATION, precision_of
from serving.repository.manifest import RepositoryManifest

__all__ = ["Calibration", "model_calibration", "check_model_calibration"]


@dataclass(frozen=True)
class Calibration:
    temperature: float  # served probabilities are softmax(logits / temperature); 1 when none was fitted
    threshold: float | None  # known_score below it is rejected as not a digit; None: nothing is rejected
    detector: str  # what the graph computes as known_score ("" for graphs exported before it existed)
    precision: str  # the precision of the graph these were fitted on ("fp32", "int8"); "" when nothing was fitted


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _repository_calibration(records: dict) -> Calibration:
    """The repository-level records, read leniently as servers always have (a bad temperature serves as 1)."""
    calibration, open_set = records.get("calibration") or {}, records.get("open_set") or {}
    temperature = calibration.get("temperature")
    threshold, detector = open_set.get("threshold"), open_set.get("detector")
    return Calibration(temperature=float(temperature) if _number(temperature) and temperature > 0 else 1.0,
                       threshold=float(threshold) if _number(threshold) else None,
                       detector=detector if isinstance(detector, str) else "",
                       precision="fp32" if calibration.get("fitted_on") else "")


def _own_calibration(entry: Any, model: str, source: str | Path, fallback: Calibration) -> Calibration:
    """A model_calibration entry, checked strictly: it is new, so a defect is the exporter's bug, not history."""
    where = f"{MODEL_CALIBRATION}.{model}"

    def fail(key: str, problem: str) -> StartupError:
        return StartupError(f"{source}: {where}.{key}: {problem}")

    if not isinstance(entry, dict) or not isinstance(entry.get("calibration"), dict):
        raise fail("calibration", "expected an object with the model's own temperature")
    temperature = entry["calibration"].get("temperature")
    if not _number(temperature) or not temperature > 0:
        raise fail("calibration.temperature", f"expected a positive number, got {temperature!r}")
    open_set = entry.get("open_set") or {}
    if not isinstance(open_set, dict):
        raise fail("open_set", f"expected an object, got {type(open_set).__name__}")
    threshold = open_set.get("threshold")
    if threshold is not None and not _number(threshold):
        raise fail("open_set.threshold", f"expected a number or null, got {threshold!r}")
    precision = entry.get("precision", "")
    if not isinstance(precision, str):
        raise fail("precision", f"expected a string, got {precision!r}")
    detector = open_set.get("detector", fallback.detector)
    return Calibration(temperature=float(temperature), threshold=None if threshold is None else float(threshold),
                       detector=detector if isinstance(detector, str) else fallback.detector,
                       precision=precision or precision_of(model))


def _entries(spec: RepositoryManifest, source: str | Path) -> dict:
    """model_calibration ({} when absent or null)."""
    own = spec.records.get(MODEL_CALIBRATION)
    if own is None:
        return {}
    if not isinstance(own, dict):
        raise StartupError(f"{source}: {MODEL_CALIBRATION}: expected an object, got {type(own).__name__}")
    return own


def model_calibration(spec: RepositoryManifest, model: str, source: str | Path = "manifest.json") -> Calibration:
    """The temperature and threshold `model`'s answers use: its own entry in model_calibration, else the
    repository's (fitted on the FP32 graph)."""
    fallback = _repository_calibration(spec.records)
    own = _entries(spec, source)
    if model not in own:
        return fallback
    return _own_calibration(own[model], model, source, fallback)


def check_model_calibration(spec: RepositoryManifest, source: str | Path) -> None:
    """Refuse at startup a model_calibration entry for a model the repository lacks, or one with a defect."""
    own = _entries(spec, source)
    for name in own:
        if name not in spec.models:
            raise StartupError(f"{source}: {MODEL_CALIBRATION}.{name}: names no model of the repository "
                               f"(models: {', '.join(sorted(spec.models))})")
        model_calibration(spec, name, source)
