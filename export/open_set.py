"""Calibration and the digit-vs-not score: temperature fitting, detectors, thresholds and the figures that judge them.

    T = fit_temperature(logits, labels)                      # minimise NLL of softmax(logits / T) over log T
    s = score("max_cosine", logits, embedding, weight)        # higher = more digit-like (numpy, for measuring)
    threshold = accept_threshold(s_held_out, accept_rate=0.99)
    auroc(s_known, s_unknown), fpr_at_tpr(s_known, s_unknown, 0.95), ece(probabilities, labels)

The exported graphs compute the shipped detector themselves (export.inference_module.KnownScore); the numpy
functions here are the reference they are checked against and what the evaluation measures with.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DETECTORS", "IN_GRAPH", "fit_mahalanobis", "mahalanobis_distance", "fit_multilayer_mahalanobis",
           "multilayer_mahalanobis", "DEFAULT_DETECTOR", "DEFAULT_ACCEPT_RATE", "ECE_BINS", "softmax", "fit_temperature", "nll",
           "score", "accept_threshold", "auroc", "fpr_at_tpr", "ece"]

# name -> what it is (higher = more digit-like). The graph ships one of them as `known_score`.
DETECTORS = {
    "max_cosine": "max over classes of cos(embedding, W_c): the angle L-Softmax's margin acts on",
    "feature_norm": "||embedding||",
    "msp": "max softmax probability at the calibrated temperature (Hendrycks & Gimpel 2017)",
    "max_logit": "max over classes of W_c . embedding",
    "mahalanobis": "minus the smallest class-conditional Mahalanobis distance of the embedding (shared, shrunk "
                   "covariance fitted on held-out digits; Lee et al. 2018)",
    "multilayer_mahalanobis": "minus the sum over the net's stages (channel means after each pooling stage) and the "
                              "embedding of each one's class-conditional Mahalanobis distance, standardised by its "
                              "median and spread on held-out digits (Lee et al. 2018's feature ensemble, equal weights)",
}
# The detectors the exported graphs can compute as known_score.
IN_GRAPH = ("multilayer_mahalanobis", "mahalanobis", "max_cosine")
MAHALANOBIS_SHRINK = 0.01
DEFAULT_DETECTOR = "multilayer_mahalanobis"  # chosen by measurement: docs/open_set.md
DEFAULT_ACCEPT_RATE = 0.99
ECE_BINS = 15
EPS = 1e-12


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """The T minimising NLL(softmax(logits / T)): NLL is convex in 1/T, so a bounded 1-D search on log T finds it."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero images")
    labels = np.asarray(labels, np.int64)
    result = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)),
                             bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def fit_mahalanobis(embedding: np.ndarray, labels: np.ndarray, num_classes: int,
                    shrink: float = MAHALANOBIS_SHRINK) -> dict:
    """Class means and a factor L of the shared precision (P = L L^T) of the embeddings, the covariance shrunk
    towards its mean variance by `shrink` (fewer images than a full covariance wants). float32 lists-ready arrays."""
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


def multilayer_mahalanobis(features: list[np.ndarray], fitted: dict) -> np.ndarray:
    """The multilayer_mahalanobis score (float64 [N], higher = more digit-like): the graph's known_score
    before its ink floor."""
    total = 0.0
    for x, layer in zip(features, fitted["layers"]):
        total = total + (mahalanobis_distance(x, layer) - layer["center"]) / layer["scale"]
    return -total


def score(name: str, logits: np.ndarray, embedding: np.ndarray, weight: np.ndarray,
          temperature: float = 1.0, fitted: dict | None = None) -> np.ndarray:
    """The detector `name` for each row (float64 [N]); weight: the classifier's W [C, D]; fitted: mahalanobis's."""
    if name == "mahalanobis":
        if fitted is None:
            raise ValueError("the mahalanobis score needs fitted means and precision factor")
        return -mahalanobis_distance(embedding, fitted)
    if name == "max_cosine":
        w = weight.astype(np.float64)
        x = embedding.astype(np.float64)
        cos = (x @ w.T) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS) \
            / np.maximum(np.linalg.norm(w, axis=1)[None, :], EPS)
        return cos.max(axis=1)
    if name == "feature_norm":
        return np.linalg.norm(embedding.astype(np.float64), axis=1)
    if name == "msp":
        return softmax(logits, temperature).max(axis=1)
    if name == "max_logit":
        return logits.astype(np.float64).max(axis=1)
    if name == "multilayer_mahalanobis":
        raise ValueError("multilayer_mahalanobis needs every stage's features: use multilayer_mahalanobis()")
    raise KeyError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")


def accept_threshold(known_scores: np.ndarray, accept_rate: float = DEFAULT_ACCEPT_RATE) -> float:
    """The threshold t such that `score >= t` accepts (at least) accept_rate of these known images."""
    if not 0.0 < accept_rate <= 1.0:
        raise ValueError(f"accept rate must be in (0, 1], got {accept_rate}")
    ordered = np.sort(np.asarray(known_scores, np.float64))
    if len(ordered) == 0:
        raise ValueError("cannot pick a threshold from zero images")
    rejected = int(math.floor((1.0 - accept_rate) * len(ordered) + 1e-9))  # at most this many fall below
    return float(ordered[min(rejected, len(ordered) - 1)])


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known image > score of an unknown one), ties counted half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2.0
    return float(u / (len(known) * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of unknowns accepted at the threshold that accepts `tpr` of the knowns."""
    return float((np.asarray(unknown) >= accept_threshold(known, tpr)).mean())


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins over [0, 1] (Guo et al. 2017)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)
