"""Class-conditional Mahalanobis distance (Lee et al. 2018): of the embedding, and of every stage of the net.

The class means and a shared covariance, shrunk towards its mean variance (fewer images than a full covariance
wants), are fitted on one part of the held-out digits. multilayer_mahalanobis measures that distance on the channel
means after each pooling stage as well as on the embedding, which sees what the embedding alone has squeezed out
(texture, stroke statistics, blank pages), each standardised by its median and spread on other held-out digits so
that no layer dominates, and sums them (docs/open_set.md).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from export.detectors.base import EPS, THRESHOLD, Detector, Features, FitData, Head

__all__ = ["MAHALANOBIS_SHRINK", "fit_mahalanobis", "mahalanobis_distance", "fit_multilayer_mahalanobis",
           "layer_distances", "multilayer_mahalanobis", "Mahalanobis", "LayerDistances", "MultiLayerMahalanobis",
           "MahalanobisDetector", "MultiLayerMahalanobisDetector", "MAHALANOBIS", "MULTILAYER_MAHALANOBIS"]

MAHALANOBIS_SHRINK = 0.01
STATS = "stats"  # the split part the class means and covariances are fitted on


def fit_mahalanobis(embedding: np.ndarray, labels: np.ndarray, num_classes: int,
                    shrink: float = MAHALANOBIS_SHRINK) -> dict:
    """Class means and a factor L of the shared precision (P = L L^T) of the features, the covariance shrunk
    towards its mean variance by `shrink`. float32 arrays."""
    x = embedding.astype(np.float64)
    labels = np.asarray(labels)
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"no held-out images of class(es) {missing} to fit the Mahalanobis means on")
    means = np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])
    residual = x - means[labels]
    cov = residual.T @ residual / len(x)
    cov += shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    factor = np.linalg.cholesky(np.linalg.inv(cov))
    return {"means": means.astype(np.float32), "precision_factor": factor.astype(np.float32)}


def mahalanobis_distance(features: np.ndarray, fitted: dict) -> np.ndarray:
    """min over classes of the squared Mahalanobis distance (float64 [N]), as differences (no cancellation)."""
    factor = np.asarray(fitted["precision_factor"], np.float64)
    z = features.astype(np.float64) @ factor
    m = np.asarray(fitted["means"], np.float64) @ factor
    best = np.full(len(z), np.inf)
    for row in m:  # one class at a time: [N, D] temporaries instead of [N, C, D]
        best = np.minimum(best, ((z - row) ** 2).sum(axis=1))
    return best


def fit_multilayer_mahalanobis(stats_features: list[np.ndarray], stats_labels: np.ndarray,
                               spread_features: list[np.ndarray], num_classes: int) -> dict:
    """One Mahalanobis fit per layer (stage taps first, embedding last) on the stats images, then each layer's
    distance centred and scaled by its median and standard deviation on *other* held-out digits (spread_features):
    on the images the covariance came from, a wide layer's distances look smaller than they will on new digits."""
    layers = []
    for stats, spread in zip(stats_features, spread_features):
        fit = fit_mahalanobis(stats, stats_labels, num_classes)
        d = mahalanobis_distance(spread, fit)
        fit["center"], fit["scale"] = float(np.median(d)), float(max(np.std(d), EPS))
        layers.append(fit)
    return {"layers": layers}


def layer_distances(features: list[np.ndarray] | tuple[np.ndarray, ...], fitted: dict) -> np.ndarray:
    """Each layer's standardised distance (d_l - center_l) / scale_l, float64 [N, L]."""
    if len(features) != len(fitted["layers"]):
        raise ValueError(f"multilayer_mahalanobis needs every stage's features: {len(fitted['layers'])} layers were "
                         f"fitted, {len(features)} given")
    return np.stack([(mahalanobis_distance(x, layer) - layer["center"]) / layer["scale"]
                     for x, layer in zip(features, fitted["layers"])], axis=1)


def multilayer_mahalanobis(features: list[np.ndarray] | tuple[np.ndarray, ...], fitted: dict) -> np.ndarray:
    """The multilayer_mahalanobis score (float64 [N], higher = more digit-like): the graph's known_score
    before its ink floor."""
    return -layer_distances(features, fitted).sum(axis=1)


class Mahalanobis(nn.Module):
    """-min_c (x - mu_c)^T P (x - mu_c) with P = L L^T (a shared, shrunk precision), as -||xL - mu_c L||^2."""

    def __init__(self, means, precision_factor) -> None:
        super().__init__()
        factor = torch.as_tensor(precision_factor).detach().float()
        self.register_buffer("factor", factor)
        self.register_buffer("projected_means", torch.as_tensor(means).detach().float() @ factor)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """min_c of the squared Mahalanobis distance to the class means, [N]."""
        # Differences, not ||z||^2 - 2 z.m + ||m||^2: the expansion cancels catastrophically in float32.
        diff = torch.matmul(features, self.factor).unsqueeze(1) - self.projected_means.unsqueeze(0)
        return (diff * diff).sum(dim=2).min(dim=1)[0]

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        return -self.distance(embedding)


class LayerDistances(nn.Module):
    """(d_l - center_l) / scale_l for the stage taps and the embedding, [N, L]: layer_distances in the graph."""

    def __init__(self, layers: list[dict]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Mahalanobis(f["means"], f["precision_factor"]) for f in layers)
        self.register_buffer("center", torch.tensor([float(f["center"]) for f in layers], dtype=torch.float32))
        self.register_buffer("inverse_scale", torch.tensor([1.0 / float(f["scale"]) for f in layers],
                                                           dtype=torch.float32))

    def forward(self, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        features = taps + [embedding]
        distances: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            distances.append(layer.distance(features[i]))
        return (torch.stack(distances, dim=1) - self.center) * self.inverse_scale


class MultiLayerMahalanobis(nn.Module):
    """-sum_l of LayerDistances."""

    def __init__(self, layers: list[dict]) -> None:
        super().__init__()
        self.distances = LayerDistances(layers)

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        return -self.distances(embedding, taps).sum(dim=1)


def _arrays(fitted: dict, *keys: str) -> dict:
    missing = [k for k in keys if k not in (fitted or {})]
    if missing:
        raise ValueError(f"the fit is missing {missing}: fit the detector on held-out digits first")
    return fitted


class MahalanobisDetector(Detector):
    """Statistics on half the held-out digits, the threshold on the other half: a threshold on the images the
    statistics came from would accept fewer unseen digits than it says."""

    name = "mahalanobis"
    description = ("minus the smallest class-conditional Mahalanobis distance of the embedding (shared, shrunk "
                   "covariance fitted on held-out digits; Lee et al. 2018)")
    split = (STATS, THRESHOLD)
    fits_on = (STATS,)

    def fit(self, data: FitData) -> dict:
        features, labels = data.part(STATS)
        return fit_mahalanobis(features.embedding, labels, data.head.num_classes)

    def score(self, features: Features, params: dict, head: Head) -> np.ndarray:
        return -mahalanobis_distance(features.embedding, _arrays(params, "means", "precision_factor"))

    def module(self, params: dict, head: Head) -> nn.Module:
        _arrays(params, "means", "precision_factor")
        return Mahalanobis(params["means"], params["precision_factor"])


class MultiLayerMahalanobisDetector(Detector):
    """Statistics on half the held-out digits; each layer's median and spread, and the threshold, on the other half
    (two numbers per layer: the images the shipped threshold was picked on also set them)."""

    name = "multilayer_mahalanobis"
    description = ("minus the sum over the net's stages (channel means after each pooling stage) and the embedding "
                   "of each one's class-conditional Mahalanobis distance, standardised by its median and spread on "
                   "held-out digits (Lee et al. 2018's feature ensemble, equal weights)")
    split = (STATS, THRESHOLD)
    fits_on = (STATS, THRESHOLD)

    def fit(self, data: FitData) -> dict:
        stats, labels = data.part(STATS)
        spread, _ = data.part(THRESHOLD)
        return fit_multilayer_mahalanobis(list(stats.layers), labels, list(spread.layers), data.head.num_classes)

    def score(self, features: Features, params: dict, head: Head) -> np.ndarray:
        return multilayer_mahalanobis(features.layers, _arrays(params, "layers"))

    def module(self, params: dict, head: Head) -> nn.Module:
        return MultiLayerMahalanobis(_arrays(params, "layers")["layers"])


MAHALANOBIS = MahalanobisDetector()
MULTILAYER_MAHALANOBIS = MultiLayerMahalanobisDetector()
