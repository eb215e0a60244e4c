"""The L-Softmax layer (Liu et al., ICML 2016) and the beta (lambda) schedules that anneal it.

Only the target logit changes in training:

    f_y = ||W_y|| ||x|| psi(theta_y),   psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m]

blended with the plain logit as f_y <- (f_y + beta * W_y^T x) / (1 + beta). In eval mode, or without a
target, the layer is a bias-free linear map, which is what export folds it into.

cos(m theta) is evaluated as the Chebyshev polynomial T_m(cos theta) by its three-term recurrence
(no acos, no pow of tensors), and k is the number of thresholds cos(j pi/m), j = 1..m-1, that
cos theta lies below, so no acos appears anywhere and the gradient is finite at theta = 0 and pi.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LSoftmaxLinear",
    "BetaSchedule",
    "CaffeBetaSchedule",
    "ExponentialBetaSchedule",
    "ConstantBetaSchedule",
    "build_beta_schedule",
    "chebyshev_cos_multiple",
]

# ||W_y|| ||x|| below this is treated as zero: cos theta is then taken as 0 and f_y is 0.
_NORM_EPS = 1e-12


def chebyshev_cos_multiple(c: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) from c = cos(theta) via T_0 = 1, T_1 = c, T_{n+1} = 2c T_n - T_{n-1}."""
    if m == 0:
        return torch.ones_like(c)
    prev, cur = torch.ones_like(c), c
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * c * cur - prev
    return cur


class LSoftmaxLinear(nn.Module):
    """Bias-free linear classifier whose target logit gets the L-Softmax angular margin in training.

    weight: [out_features, in_features] (nn.Linear layout), Kaiming (fan-in) initialised here.
    beta:   0-dim float buffer, written by a schedule outside the layer, saved in state_dict.
    """

    def __init__(self, in_features: int, out_features: int, margin: int) -> None:
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("beta", torch.tensor(0.0))
        # cos(j pi / m) for j = 1..m-1, descending: theta > j pi/m  <=>  cos theta < cos(j pi/m).
        thresholds = [math.cos(j * math.pi / margin) for j in range(1, margin)]
        self.register_buffer("_thresholds", torch.tensor(thresholds, dtype=torch.float64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, margin={self.margin}"

    def psi(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """psi(theta) = (-1)^k T_m(cos theta) - 2k, monotone decreasing on [0, pi], range [1-2m, 1]."""
        m = self.margin
        if m == 1:
            return cos_theta
        k = (cos_theta.unsqueeze(-1) < self._thresholds.to(cos_theta.dtype)).sum(-1).to(cos_theta.dtype)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k without pow
        return sign * chebyshev_cos_multiple(cos_theta, m) - 2.0 * k

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [B, C] = W x
        if not self.training or target is None or self.margin == 1:
            # m = 1: psi(theta) = cos(theta), so f_y = W_y^T x and the blend is the identity.
            return logits
        target = target.view(-1, 1)
        plain_target = logits.gather(1, target).squeeze(1)  # W_y^T x, [B]
        norm_product = self.weight.norm(dim=1)[target.squeeze(1)] * x.norm(dim=1)  # ||W_y|| ||x||, [B]
        safe_norm = norm_product.clamp_min(_NORM_EPS)
        cos_theta = (plain_target / safe_norm).clamp(-1.0, 1.0)
        margin_target = norm_product * self.psi(cos_theta)
        beta = self.beta.to(logits.dtype)
        blended = (margin_target + beta * plain_target) / (1.0 + beta)
        return logits.scatter(1, target, blended.unsqueeze(1))


class BetaSchedule:
    """Writes `layer.beta` once per training iteration; `state_dict` holds the iteration counter."""

    def __init__(self, layer: LSoftmaxLinear) -> None:
        self.layer = layer
        self.iteration = 0
        self._write()

    def value(self, iteration: int) -> float:
        raise NotImplementedError

    @property
    def current(self) -> float:
        return self.value(self.iteration)

    def _write(self) -> None:
        with torch.no_grad():
            self.layer.beta.fill_(self.current)

    def step(self) -> None:
        self.iteration += 1
        self._write()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._write()


class CaffeBetaSchedule(BetaSchedule):
    """beta = max(beta_min, base * (1 + gamma * iter) ** -power): the authors' Caffe schedule (MNIST values)."""

    def __init__(self, layer, base: float = 1000.0, gamma: float = 2.5e-5, power: float = 35.0,
                 beta_min: float = 0.0) -> None:
        self.base, self.gamma, self.power, self.beta_min = base, gamma, power, beta_min
        super().__init__(layer)

    def value(self, iteration: int) -> float:
        return max(self.beta_min, self.base * (1.0 + self.gamma * iteration) ** (-self.power))


class ExponentialBetaSchedule(BetaSchedule):
    """beta = max(beta_min, start * factor ** iter): the PyTorch seed's per-forward decay (100, 0.99)."""

    def __init__(self, layer, start: float = 100.0, factor: float = 0.99, beta_min: float = 0.0) -> None:
        self.start, self.factor, self.beta_min = start, factor, beta_min
        super().__init__(layer)

    def value(self, iteration: int) -> float:
        return max(self.beta_min, self.start * self.factor ** iteration)


class ConstantBetaSchedule(BetaSchedule):
    """A fixed beta (0 gives pure L-Softmax from the first iteration)."""

    def __init__(self, layer, value: float = 0.0) -> None:
        self.constant = value
        super().__init__(layer)

    def value(self, iteration: int) -> float:
        return self.constant


def build_beta_schedule(kind: str, layer: LSoftmaxLinear, **params) -> BetaSchedule:
    """Build a schedule by name ('caffe', 'exp', 'constant'); unknown params are an error."""
    kinds = {"caffe": CaffeBetaSchedule, "exp": ExponentialBetaSchedule, "constant": ConstantBetaSchedule}
    if kind not in kinds:
        raise ValueError(f"unknown beta schedule {kind!r}; choose from {sorted(kinds)}")
    return kinds[kind](layer, **params)
