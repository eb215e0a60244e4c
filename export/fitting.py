"""Fitting what the graph ships besides the net: the softmax temperature, the known_score detector, its threshold.

The temperature minimises NLL on all the fit images. The detector (export.detectors) deals them into the parts its
`split` names, is fitted on the parts its `fits_on` names (the learned one also against training negatives), and
the threshold is picked on the `threshold` part from the finished graph's own known_score (its ink floor included),
as the fraction `accept_rate` of those digits accepted.
"""

from __future__ import annotations

import numpy as np
import torch

from export import open_set
from export.detectors import THRESHOLD, UNFITTED_DETECTOR, Detector, Features, FitData, Head, get
from export.inference_module import build_inference_module, graph_features

__all__ = ["NOT_FITTED", "NEGATIVES_SEED", "NEGATIVES_GENERATOR", "training_negatives", "calibration_record", "fit"]

NOT_FITTED = ("{checkpoint} records no held-out images (trained with --val-size 0 or before it was recorded): "
              "the served probabilities stay uncalibrated (temperature 1) and no input is rejected as not a digit. "
              "Retrain with a held-out split, or export with --fit-on-training-images to fit on training images the "
              "net has seen (recorded in the manifest; the threshold then accepts more unknowns than it should)")
# A seed of its own, far from the small --seed values training runs use (and make their --negatives pool with), so
# that a detector is not fitted against the very negatives the net was trained against.
NEGATIVES_SEED = 22_000
NEGATIVES_GENERATOR = "training.negatives.negative_images"


def training_negatives(count: int, seed: int, digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 [count, 1, 28, 28] images that are not digits, hard ones made from these digits (imported here: only
    a detector fitted against negatives needs the generator and its fonts)."""
    from training.negatives import negative_images

    return negative_images(count, seed, digits, labels)


def _negatives(detector: Detector, rows: dict[str, np.ndarray], base, images: torch.Tensor,
               labels: torch.Tensor) -> tuple[Features | None, dict | None]:
    """The negatives' features and their manifest record, when the detector asks for negatives."""
    wanted = detector.negatives_needed(rows)
    if wanted is None:
        return None, None
    count, source = wanted
    index = torch.from_numpy(source)
    pixels = training_negatives(count, NEGATIVES_SEED, images[index].numpy(), labels[index].numpy())
    return graph_features(base, torch.from_numpy(pixels)), {
        "count": int(len(pixels)), "generator": NEGATIVES_GENERATOR, "seed": NEGATIVES_SEED,
        "hard_negatives_from_digits": int(len(source))}


def _known_scores(module, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([module(images[i:i + batch_size])[2].numpy() for i in range(0, len(images), batch_size)])


def calibration_record(logits: np.ndarray, labels: np.ndarray, temperature: float, fitted_on: dict) -> dict:
    """The manifest's calibration record: the temperature and what it does to NLL and ECE on the fit images (the
    FP32 graph's here, the INT8 graph's in export.int8_fit)."""
    return {"temperature": temperature, "fitted_on": fitted_on,
            "nll_before": open_set.nll(logits, labels), "nll_after": open_set.nll(logits, labels, temperature),
            "ece_before": open_set.ece(open_set.softmax(logits), labels),
            "ece_after": open_set.ece(open_set.softmax(logits, temperature), labels)}


@torch.no_grad()
def fit(net, ckpt: dict, images: torch.Tensor | None, labels: torch.Tensor | None, fitted_on: dict | None,
        detector: str, accept_rate: float, log=print) -> tuple[torch.nn.Module, dict, dict]:
    """The inference module with its known_score detector, and the manifest's calibration and open_set records.
    Without fit images: temperature 1, max cosine and no threshold, said in one line."""
    normalization = ckpt["config"]["normalization"]
    if images is None:
        log(NOT_FITTED.format(checkpoint=ckpt.get("_path", "the checkpoint")))
        module = build_inference_module(net, normalization, detector=UNFITTED_DETECTOR)
        return module, {"temperature": 1.0, "fitted_on": None}, {
            "output": "known_score", "detector": UNFITTED_DETECTOR, "threshold": None, "accept_rate": None,
            "fitted_on": None, "description": get(UNFITTED_DETECTOR).description}
    chosen, labels_np = get(detector), labels.numpy()
    base = build_inference_module(net, normalization)
    features = graph_features(base, images)
    temperature = open_set.fit_temperature(features.logits, labels_np)
    calibration = calibration_record(features.logits, labels_np, temperature, fitted_on)
    head = Head(net.head.weight.detach().numpy(), temperature)

    rows = chosen.split_rows(len(labels_np))
    negatives, negatives_record = _negatives(chosen, rows, base, images, labels)
    params = chosen.fit(FitData(head, {part: (features.rows(rows[part]), labels_np[rows[part]])
                                       for part in chosen.fits_on}, negatives))
    module = build_inference_module(net, normalization, detector=chosen.name, fitted=params, temperature=temperature)
    threshold_rows = rows[THRESHOLD]
    scores = _known_scores(module, images[torch.from_numpy(threshold_rows)])
    threshold = open_set.accept_threshold(scores, accept_rate)
    record = {"output": "known_score", "detector": chosen.name, "threshold": threshold, "accept_rate": accept_rate,
              "fit_accepted": float((scores >= threshold).mean()), "fitted_on": fitted_on,
              "threshold_images": len(threshold_rows), "description": chosen.description,
              "split": {part: len(r) for part, r in rows.items()}}
    summary = chosen.summary(params)
    if summary:
        record["fit"] = summary
    if negatives_record:
        record["negatives"] = negatives_record
    log(f"calibration: temperature {temperature:.4g} on {len(labels_np)} {fitted_on['source']} (NLL "
        f"{calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}, ECE {100 * calibration['ece_before']:.2f}% -> "
        f"{100 * calibration['ece_after']:.2f}%); known_score {chosen.name} >= {threshold:.6g} accepts "
        f"{100 * record['fit_accepted']:.2f}% of {len(threshold_rows)} of them"
        + (f" (fitted against {negatives_record['count']} training negatives)" if negatives_record else ""))
    return module, calibration, record
