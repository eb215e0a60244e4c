"""The learned detector: the other detectors' scores, weighted by a logistic regression of digits against negatives.

Features per image: multilayer_mahalanobis's standardised distance at each stage tap and at the embedding, MSP and
energy at the calibrated temperature, and max cosine. The weights are fitted on held-out digits (1) against the
training negatives (0, training.negatives: letters, scribbles, digit fragments), never against the unknown sets the
evaluation measures with. The score is the regression's logit w.f + b (higher = digit).

The held-out digits are dealt in a cycle of four (stats, logistic, stats, threshold), so that no two of the
Mahalanobis statistics, the logistic regression and the threshold are fitted on the same images:
- stats (half): the class means and covariances of each layer;
- logistic (a quarter): each layer's median and spread, then the regression, against as many negatives, their hard
  ones made from the stats digits (so that no negative is a piece of a digit the regression or threshold scores);
- threshold (a quarter): nothing but the acceptance threshold.
Only the temperature (one number, calibrating the served probabilities) is fitted on all of them, as for msp.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from export.detectors.base import THRESHOLD, Detector, Features, FitData, Head
from export.detectors.embedding import MaxCosine, max_cosine
from export.detectors.logistic import L2, fit_logistic
from export.detectors.logits import Energy, Msp, energy
from export.detectors.mahalanobis import STATS, LayerDistances, fit_multilayer_mahalanobis, layer_distances
from export.open_set import softmax

__all__ = ["LOGISTIC", "feature_names", "learned_features", "Learned", "LearnedDetector", "LEARNED"]

LOGISTIC = "logistic"
SCORE_FEATURES = ("msp", "energy", "max_cosine")  # after the per-layer distances


def feature_names(layers: int) -> list[str]:
    """mahalanobis_stage1 .. mahalanobis_stage<layers-1>, mahalanobis_embedding, then SCORE_FEATURES."""
    return [f"mahalanobis_stage{i + 1}" for i in range(layers - 1)] + ["mahalanobis_embedding", *SCORE_FEATURES]


def learned_features(features: Features, fitted: dict, head: Head) -> np.ndarray:
    """The regression's inputs, float64 [N, layers + 3], in feature_names' order."""
    return np.column_stack([layer_distances(features.layers, fitted),
                            softmax(features.logits, head.temperature).max(axis=1),
                            energy(features.logits, head.temperature),
                            max_cosine(features.embedding, head.weight)])


class Learned(nn.Module):
    """w . [per-layer distances, MSP, energy, max cosine] + b, each feature as its own detector computes it, in
    float64: a feature whose spread is small next to its size (MSP or energy at a high temperature) gets a large
    weight once the standardisation is folded in, and float32 rounding of it would then show in the score (and
    differ between runtimes by more than the export's parity check allows)."""

    def __init__(self, layers: list[dict], weight, temperature: float, coefficients, bias: float) -> None:
        super().__init__()
        self.distances = LayerDistances(layers)
        self.msp, self.energy, self.cosine = Msp(temperature), Energy(temperature), MaxCosine(weight)
        self.register_buffer("coefficients", torch.as_tensor(np.asarray(coefficients, np.float64)))
        self.register_buffer("bias", torch.tensor(float(bias), dtype=torch.float64))
        self.double()

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        logits, embedding = logits.double(), embedding.double()
        taps = [tap.double() for tap in taps]
        scores = torch.stack([self.msp(logits, embedding, taps), self.energy(logits, embedding, taps),
                              self.cosine(logits, embedding, taps)], dim=1)
        features = torch.cat([self.distances(embedding, taps), scores], dim=1)
        return (torch.matmul(features, self.coefficients) + self.bias).float()


class LearnedDetector(Detector):
    name = "learned"
    description = ("a logistic regression of held-out digits against training negatives on the per-layer "
                   "standardised Mahalanobis distances, MSP and energy at the calibrated temperature and max cosine: "
                   "its logit")
    split = (STATS, LOGISTIC, STATS, THRESHOLD)
    fits_on = (STATS, LOGISTIC)

    def negatives_needed(self, rows: dict[str, np.ndarray]) -> tuple[int, np.ndarray] | None:
        """As many negatives as the regression has digits, made from the stats digits."""
        return len(rows[LOGISTIC]), rows[STATS]

    def fit(self, data: FitData) -> dict:
        stats, stats_labels = data.part(STATS)
        digits, _ = data.part(LOGISTIC)
        if data.negatives is None or len(data.negatives) == 0:
            raise ValueError("the learned detector is fitted against negatives, and none were given")
        fitted = fit_multilayer_mahalanobis(list(stats.layers), stats_labels, list(digits.layers),
                                            data.head.num_classes)
        x = np.concatenate([learned_features(digits, fitted, data.head),
                            learned_features(data.negatives, fitted, data.head)])
        y = np.concatenate([np.ones(len(digits)), np.zeros(len(data.negatives))])
        weights, bias, standardised = fit_logistic(x, y, L2)
        return {**fitted, "features": feature_names(len(fitted["layers"])), "weights": weights, "bias": bias,
                "standardised_weights": standardised, "l2": L2, "digits": len(digits), "stats_digits": len(stats)}

    def score(self, features: Features, params: dict, head: Head) -> np.ndarray:
        return learned_features(features, params, head) @ np.asarray(params["weights"], np.float64) \
            + float(params["bias"])

    def module(self, params: dict, head: Head) -> nn.Module:
        if "weights" not in (params or {}):
            raise ValueError("the learned detector has no fitted weights: fit it on held-out digits first")
        return Learned(params["layers"], head.weight, head.temperature, params["weights"], params["bias"])

    def summary(self, params: dict) -> dict:
        names = params["features"]
        return {"weights": dict(zip(names, map(float, params["weights"]))), "bias": float(params["bias"]),
                "standardised_weights": dict(zip(names, map(float, params["standardised_weights"]))),
                "l2": params["l2"], "digits": params["digits"], "stats_digits": params["stats_digits"]}


LEARNED = LearnedDetector()
