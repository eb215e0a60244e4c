"""Detectors on the embedding alone, with nothing fitted: max cosine to the class weights, and the feature norm."""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from export.detectors.base import EPS, Unfitted

__all__ = ["MaxCosine", "MAX_COSINE", "FEATURE_NORM", "max_cosine"]


def max_cosine(embedding: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """max over classes of cos(embedding, W_c), float64 [N]."""
    w = weight.astype(np.float64)
    x = embedding.astype(np.float64)
    cos = (x @ w.T) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS) \
        / np.maximum(np.linalg.norm(w, axis=1)[None, :], EPS)
    return cos.max(axis=1)


class MaxCosine(nn.Module):
    """max_c cos(embedding, W_c): the angle L-Softmax's margin acts on (no fitted parameters)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = torch.as_tensor(weight).detach().float()
        self.register_buffer("unit_weight", weight / weight.norm(dim=1, keepdim=True).clamp_min(EPS))

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        norm = torch.sqrt((embedding * embedding).sum(dim=1, keepdim=True)).clamp_min(1e-12)  # EPS (TorchScript)
        cos = torch.matmul(embedding / norm, self.unit_weight.t())
        return cos.max(dim=1)[0]


MAX_COSINE = Unfitted("max_cosine", "max over classes of cos(embedding, W_c): the angle L-Softmax's margin acts on",
                      lambda features, head: max_cosine(features.embedding, head.weight),
                      lambda head: MaxCosine(torch.as_tensor(head.weight)))
FEATURE_NORM = Unfitted("feature_norm", "||embedding||",
                        lambda features, head: np.linalg.norm(features.embedding.astype(np.float64), axis=1))
