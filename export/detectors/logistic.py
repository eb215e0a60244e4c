"""L2-regularised logistic regression in numpy + scipy: the learned detector's combination of scores.

No sklearn: the fit is a few lines of L-BFGS on a convex loss, and the export should not grow a dependency for it.
"""

from __future__ import annotations

import numpy as np

from export.detectors.base import EPS

__all__ = ["L2", "fit_logistic"]

# On the mean class-balanced loss over standardised features: keeps the weights finite when digits and negatives
# separate perfectly (the unregularised optimum is then at infinity) and shares weight among correlated features.
L2 = 1e-2


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float, np.ndarray]:
    """(w, b, w_standardised) minimising the class-balanced mean log-loss of sigmoid(w.x + b) against y (1/0)
    plus l2/2 ||w_standardised||^2, on features standardised inside (each to mean 0, std 1 over x), so that the
    penalty treats every feature alike whatever its units. The standardisation is folded into w and b: w.x + b is
    the fitted logit on raw features (higher = more like y = 1); w_standardised says how much each feature counts."""
    from scipy.optimize import minimize

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features [N, F] and labels [N] expected, got {x.shape} and {y.shape}")
    counts = np.array([(y == 0).sum(), (y == 1).sum()])
    if counts.min() == 0:
        raise ValueError(f"logistic regression needs both classes (have {counts[1]} positives, {counts[0]} negatives)")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > EPS, std, 1.0)  # a constant feature stays at 0 after centring: only the penalty moves it
    z = (x - mean) / std
    sign = 2.0 * y - 1.0
    sample = 0.5 / counts[y.astype(np.int64)]  # each class weighs half, whatever the counts

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        margin = sign * (z @ w + b)
        value = sample @ np.logaddexp(0.0, -margin) + 0.5 * l2 * (w @ w)
        dmargin = -sample * sign * np.exp(-np.logaddexp(0.0, margin))  # d loss / d logit: -s * sigmoid(-margin)
        return float(value), np.append(z.T @ dmargin + l2 * w, dmargin.sum())

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
    w_standardised, b_standardised = result.x[:-1], float(result.x[-1])
    w = w_standardised / std
    return w, b_standardised - float(w @ mean), w_standardised
