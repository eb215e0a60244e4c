"""Capture-like augmentation: digits (and negatives) softened as a photo, a scan or a chalkboard leaves them.

Trained beside negatives, a net learns to refuse whatever is unlike its crisp MNIST digits, and a photographed
digit, framed by the server, has softer edges and greyer strokes than any of them: without this, outlier exposure
took 99% of photographed digits for digits down to 8% (docs/open_set.md). Every training image, digit or negative
alike, so that texture tells neither apart, gets with probability 1/2 a Gaussian blur (sigma 0.4-1.1 px) and with
probability 1/2 greyer or bolder strokes (gamma 0.6-1.6), then its brightest pixel set back to white, as the
server's framing stretches contrast. The draws come from a generator the caller seeds per epoch (resume-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data import MNIST_MEAN, MNIST_STD

__all__ = ["capture_like", "BLUR_SIGMA", "GAMMA"]

BLUR_SIGMA = (0.4, 1.1)
GAMMA = (0.6, 1.6)
_KERNEL = 5


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=generator)


def capture_like(images: torch.Tensor, generator: torch.Generator, mean: float = MNIST_MEAN,
                 std: float = MNIST_STD) -> torch.Tensor:
    """Normalised images [N, 1, 28, 28] -> the same, each softened at random (see the module's docstring)."""
    n = images.shape[0]
    device = images.device
    x = (images * std + mean).clamp(0.0, 1.0)
    blur, grey = (torch.rand(n, generator=generator) < 0.5 for _ in range(2))
    sigma = _uniform(n, BLUR_SIGMA, generator)
    gamma = torch.where(grey, _uniform(n, GAMMA, generator), torch.ones(n))
    offsets = torch.arange(_KERNEL, dtype=torch.float32) - _KERNEL // 2
    taps = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    taps = torch.where(blur[:, None], taps / taps.sum(dim=1, keepdim=True), (offsets == 0).float()[None, :])
    kernels = (taps[:, :, None] * taps[:, None, :])[:, None].to(device=device, dtype=x.dtype)  # [N, 1, K, K]
    x = F.conv2d(x.reshape(1, n, 28, 28), kernels, padding=_KERNEL // 2, groups=n).reshape(n, 1, 28, 28)
    x = x.clamp_min(0.0) ** gamma.to(device=device, dtype=x.dtype)[:, None, None, None]
    x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std
