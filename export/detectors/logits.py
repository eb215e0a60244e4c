"""Detectors on the logits alone, nothing fitted but the temperature: max softmax probability, max logit, energy.

Cheap enough to ship in the graph (a reduction over ten logits); MSP and energy read the calibrated temperature.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from export.detectors.base import Unfitted
from export.open_set import softmax

__all__ = ["Msp", "MaxLogit", "Energy", "MSP", "MAX_LOGIT", "ENERGY", "energy"]


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """T * logsumexp(logits / T), float64 [N]: minus the free energy (Liu et al. 2020), higher = more digit-like."""
    z = logits.astype(np.float64) / temperature
    top = z.max(axis=1)
    return temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


class _AtTemperature(nn.Module):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / float(temperature), dtype=torch.float32))


class Msp(_AtTemperature):
    """max_c softmax(logits / T)_c, as 1 / sum_j exp(z_j - max z): no division by a sum that may underflow."""

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        z = logits * self.inverse_temperature
        return 1.0 / torch.exp(z - z.max(dim=1, keepdim=True)[0]).sum(dim=1)


class Energy(_AtTemperature):
    """T * logsumexp(logits / T), written out with the max taken first so that no exp overflows in any runtime."""

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        z = logits * self.inverse_temperature
        top = z.max(dim=1, keepdim=True)[0]
        return self.temperature * (top.squeeze(1) + torch.log(torch.exp(z - top).sum(dim=1)))


class MaxLogit(nn.Module):
    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        return logits.max(dim=1)[0]


MSP = Unfitted("msp", "max softmax probability at the calibrated temperature (Hendrycks & Gimpel 2017)",
               lambda features, head: softmax(features.logits, head.temperature).max(axis=1),
               lambda head: Msp(head.temperature))
MAX_LOGIT = Unfitted("max_logit", "max over classes of W_c . embedding",
                     lambda features, head: features.logits.astype(np.float64).max(axis=1), lambda head: MaxLogit())
ENERGY = Unfitted("energy", "T * logsumexp(logits / T) at the calibrated temperature: minus the free energy "
                  "(Liu et al. 2020)", lambda features, head: energy(features.logits, head.temperature),
                  lambda head: Energy(head.temperature))
