"""The inference module: raw uint8 pixels in, (logits, embedding) out, with the margin folded away.

In eval mode L-Softmax is a bias-free linear map (the margin only ever touched the target logit in
training), so the served graph is backbone -> nn.Linear(W, bias=False). The pixel normalisation
(x / 255 - mean) / std is folded in front as one affine map, so every runtime gets the same answer
from the same raw pixels.
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn

__all__ = ["InferenceModule", "build_inference_module"]


class InferenceModule(nn.Module):
    """image uint8 [N, 1, 28, 28] -> (logits fp32 [N, C], embedding fp32 [N, D])."""

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, scale: float, mean: float, std: float) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval()
        out_features, in_features = weight.shape
        self.classifier = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
        # (x * scale - mean) / std == x * gain + offset
        self.register_buffer("gain", torch.tensor(scale / std, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(-mean / std, dtype=torch.float32))
        self.requires_grad_(False)  # an inference graph: no autograd bookkeeping in any runtime
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = image.to(torch.float32) * self.gain + self.offset
        embedding = self.backbone(x)
        return self.classifier(embedding), embedding


def build_inference_module(model: nn.Module, normalization: dict) -> InferenceModule:
    """Fold a trained LSoftmaxNet (backbone + LSoftmaxLinear head) into an InferenceModule."""
    return InferenceModule(
        model.backbone,
        model.head.weight.detach(),
        float(normalization.get("scale", 1.0 / 255.0)),
        float(normalization["mean"]),
        float(normalization["std"]),
    )
