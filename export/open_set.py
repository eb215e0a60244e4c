"""Calibration and judging the digit-vs-not score: temperature fitting, thresholds and the figures.

    T = fit_temperature(logits, labels)                      # minimise NLL of softmax(logits / T) over log T
    threshold = accept_threshold(s_held_out, accept_rate=0.99)
    auroc(s_known, s_unknown), fpr_at_tpr(s_known, s_unknown, 0.95), ece(probabilities, labels)

The detectors themselves (their fits, numpy references and in-graph modules) are export.detectors.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_ACCEPT_RATE", "ECE_BINS", "softmax", "fit_temperature", "nll", "accept_threshold", "auroc",
           "fpr_at_tpr", "ece"]

DEFAULT_ACCEPT_RATE = 0.99
ECE_BINS = 15


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
