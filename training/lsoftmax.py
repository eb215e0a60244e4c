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


def _s(n: int) -> int:
    """Sign pattern +1, +1, -1, -1, ... (n = 0, 1, 2, 3, ...) of the folded U_n recurrence."""
    return 1 if n % 4 in (0, 1) else -1


class _LSoftmaxFunction(torch.autograd.Function):
    """Fused forward/backward of the training-mode layer: one autograd node instead of ~30 small ones.

    With p = W_y^T x, N = ||W_y|| ||x||, c = p / N and f = N psi(c), the target logit is
    out_y = (f + beta p) / (1 + beta), so
        d out_y / d p = (psi'(c) + beta) / (1 + beta),   d out_y / d N = (psi(c) - c psi'(c)) / (1 + beta),
    with psi'(c) = (-1)^k m U_{m-1}(c). p flows back through W x like every other logit, and N through
    d N / d x = ||W_y|| x / ||x||, d N / d W_y = ||x|| W_y / ||W_y||.

    Every per-sample quantity is a [B, 1] column, so gather/scatter/addcmul_ take them without the
    squeeze/unsqueeze views (each a dispatch of its own at this size). Under autocast the caller
    (LSoftmaxLinear.forward) casts to float32 and turns autocast off, which torch.amp.custom_fwd/bwd did
    at the cost of an autocast context manager in every backward.
    """

    @staticmethod
    def forward(ctx, x, weight, target, beta, layer: "LSoftmaxLinear"):
        # beta: a float, or a 0-dim tensor on the GPU (reading it as a float there would wait for the GPU
        # at every step; the arithmetic below takes either).
        logits = x.mm(weight.t())  # [B, C]
        t = target.reshape(-1, 1)  # the only index tensor: gather/scatter/take/scatter_add_ all take [B, 1]
        p = logits.gather(1, t)  # W_y^T x, [B, 1]
        w_norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)  # [C, 1]
        a = w_norm.take(t)  # ||W_y||, [B, 1]
        b = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # ||x||, [B, 1]
        n = a * b
        c = (p / n.clamp_min(_NORM_EPS)).clamp_(-1.0, 1.0)
        psi, dpsi = layer.psi_and_derivative(c)
        out_y = n * psi
        # (n psi + beta p) / (1 + beta)
        inv = None
        if isinstance(beta, torch.Tensor):
            out_y = out_y.add_(p * beta).div_(1.0 + beta)
        elif beta != 0:
            # 1 / (1 + beta) as a 0-dim tensor, made once and used here and three times in backward: an op
            # between a tensor and a Python float costs ~2 us more than one between two tensors (it wraps
            # the float in a fresh tensor each time); same float32 value, so the same bits.
            inv = torch.scalar_tensor(1.0 / (1.0 + beta), dtype=x.dtype, device=x.device)
            out_y = out_y.add_(p, alpha=beta).mul_(inv)
            ctx.one = layer._tables(c)[2]
        logits.scatter_(1, t, out_y)
        ctx.save_for_backward(x, weight)
        # Intermediates (neither inputs nor outputs) may live on ctx directly: cheaper than saved variables.
        ctx.intermediates = (t, a, b, w_norm, c, psi, dpsi)
        ctx.beta, ctx.inv = beta, inv
        return logits

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_autocast_enabled(grad_out.device.type):  # the forward ran in float32 without autocast
            with torch.autocast(grad_out.device.type, enabled=False):
                return _LSoftmaxFunction._backward(ctx, grad_out)
        return _LSoftmaxFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        t, a, b, w_norm, c, psi, dpsi = ctx.intermediates
        beta = ctx.beta
        g_y = grad_out.gather(1, t)  # [B, 1]
        # With beta = 0 (a float) the blend is the identity: d_p = psi', d_n = psi - c psi', bit for bit
        # what (. + 0) * 1 gives, two ops fewer.
        d_n = torch.addcmul(psi, c, dpsi, value=-1.0)
        if isinstance(beta, torch.Tensor):
            inv = 1.0 / (1.0 + beta)
            d_p = (dpsi + beta).mul_(inv)
            d_n.mul_(inv)
        elif beta != 0:
            inv = ctx.inv
            d_p = torch.add(dpsi, ctx.one, alpha=beta).mul_(inv)  # (psi' + beta * 1) / (1 + beta)
            d_n.mul_(inv)
        else:
            d_p = dpsi
        grad = grad_out.scatter(1, t, g_y * d_p)  # dL/d(W x) with the target column replaced
        s = g_y.mul_(d_n)  # dL/dN, [B, 1] (g_y is a fresh tensor from gather)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(weight)
            grad_x.addcmul_(s * a / b.clamp_min(_NORM_EPS), x)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
            per_class = torch.zeros_like(w_norm).scatter_add_(0, t, s * b)
            grad_w.addcmul_(per_class / w_norm.clamp_min(_NORM_EPS), weight)
        return grad_x, grad_w, None, None, None


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
        # Thresholds cos(j pi/m), j = m-1..1, ascending. With i = bucketize(c, thresholds, right=True) the
        # number of thresholds <= c, theta lies in [k pi/m, (k+1) pi/m] for k = m-1-i; the tables give
        # (-1)^k and -2k by i, so no acos, floor or pow is needed.
        thresholds = [math.cos(j * math.pi / margin) for j in range(margin - 1, 0, -1)]
        ks = [margin - 1 - i for i in range(margin)]
        self.register_buffer("_thresholds", torch.tensor(thresholds, dtype=torch.float64), persistent=False)
        self.register_buffer("_sign", torch.tensor([(-1.0) ** k for k in ks], dtype=torch.float64), persistent=False)
        self.register_buffer("_offset", torch.tensor([-2.0 * k for k in ks], dtype=torch.float64), persistent=False)
        self._table_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, margin={self.margin}"

    def psi_and_derivative(self, cos_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi(c), d psi / d c) with psi = (-1)^k T_m(c) - 2k and T_m' = m U_{m-1}.

        U_n (Chebyshev, 2nd kind) by U_{n+1} = 2c U_n - U_{n-1}, kept as r_n = s_n U_n with the sign
        pattern s = +,+,-,-,+,+,... so that each step is a single addcmul, r_{n+1} = r_{n-1} -/+ 2c r_n;
        T_m = c U_{m-1} - U_{m-2}. The signs s_n, (-1)^k and the factor m sit in the per-k table.
        """
        m, c = self.margin, cos_theta
        if m == 1:
            return c, torch.ones_like(c)
        thresholds, (t_sign, offset, d_sign), one = self._tables(c)
        i = torch.bucketize(c, thresholds, right=True)
        # take() keeps the shape of i, whatever the shape of c; three takes cost less than one [m, 3]
        # row lookup and its unbind.
        t_sign, offset, d_sign = t_sign.take(i), offset.take(i), d_sign.take(i)
        r_prev, r = one, c + c  # r_0 = U_0 = 1, r_1 = U_1 = 2c
        for n in range(1, m - 1):
            r_prev, r = r, torch.addcmul(r_prev, c, r, value=-2.0 if n % 2 else 2.0)
        # T_m = c s_{m-1} r_{m-1} - s_{m-2} r_{m-2} = -s_{m-2} * (r_{m-2} - s_{m-1} s_{m-2} c r_{m-1})
        t_m = torch.addcmul(r_prev, c, r, value=-float(_s(m - 1) * _s(m - 2)))
        return torch.addcmul(offset, t_sign, t_m), d_sign * r

    def _tables(self, like: torch.Tensor):
        """(thresholds, the per-bucket columns (-1)^k * -s_{m-2}, -2k, (-1)^k * m * s_{m-1}, scalar 1) in
        `like`'s dtype and device, built once and cached (an op between a tensor and a Python float wraps the
        float in a fresh tensor every time)."""
        key = (like.dtype, like.device)
        cached = self._table_cache.get(key)
        if cached is None:
            m = self.margin
            rows = [[float(sign) * -_s(m - 2), float(offset), float(sign) * m * _s(m - 1)]
                    for sign, offset in zip(self._sign.tolist(), self._offset.tolist())]
            cached = (self._thresholds.to(like.dtype),
                      tuple(torch.tensor(rows, dtype=like.dtype, device=like.device).t().contiguous()),
                      torch.ones((), dtype=like.dtype, device=like.device))
            self._table_cache[key] = cached
        return cached

    def psi(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """psi(theta) = (-1)^k T_m(cos theta) - 2k, monotone decreasing on [0, pi], range [1-2m, 1]."""
        return self.psi_and_derivative(cos_theta)[0]

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or target is None or self.margin == 1:
            # m = 1: psi(theta) = cos(theta), so f_y = W_y^T x and the blend is the identity.
            return F.linear(x, self.weight)
        if torch.is_autocast_enabled(x.device.type):
            # The margin needs float32 under AMP: cos(m theta) is a degree-m polynomial.
            with torch.autocast(x.device.type, enabled=False):
                return self._margin_logits(x.float(), self.weight.float(), target)
        return self._margin_logits(x, self.weight, target)

    def _margin_logits(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        beta = float(self.beta) if self.beta.device.type == "cpu" else self.beta.to(x.dtype)
        return _LSoftmaxFunction.apply(x, weight, target, beta, self)


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
