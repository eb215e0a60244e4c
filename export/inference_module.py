"""The inference module: raw uint8 pixels in, (logits, embedding, known_score) out, with the margin folded away.

In eval mode L-Softmax is a bias-free linear map (the margin only ever touched the target logit in
training), so the served graph is backbone -> nn.Linear(W, bias=False). The pixel normalisation
(x / 255 - mean) / std is folded in front as one affine map, so every runtime gets the same answer
from the same raw pixels. `known_score` (higher = more digit-like) is the open-set detector the export chose
(export.open_set): max cosine between the embedding and the class weights, or the negated class-conditional
Mahalanobis distance with a shared covariance (Lee et al. 2018), computed inside the graph so Triton and
KServe users get it too.
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn

__all__ = ["InferenceModule", "build_inference_module", "MaxCosine", "Mahalanobis", "scorer"]


# Ink below this many full-white pixels' worth is not a digit: every MNIST training digit has at least 19.9
# (measured over the 60,000), an all-black page 0, a 2x2 dot 4. Such inputs get NO_INK_SCORE as known_score.
MIN_INK = 10.0
NO_INK_SCORE = -1.0e6


class MaxCosine(nn.Module):
    """max_c cos(embedding, W_c): the angle L-Softmax's margin acts on (no fitted parameters)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("unit_weight", weight.detach().float() / weight.detach().float().norm(dim=1, keepdim=True)
                             .clamp_min(1e-12))

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        norm = torch.sqrt((embedding * embedding).sum(dim=1, keepdim=True)).clamp_min(1e-12)
        cos = torch.matmul(embedding / norm, self.unit_weight.t())
        return cos.max(dim=1)[0]


class Mahalanobis(nn.Module):
    """-min_c (x - mu_c)^T P (x - mu_c) with P = L L^T (a shared, shrunk precision), as -||xL - mu_c L||^2."""

    def __init__(self, means: torch.Tensor, precision_factor: torch.Tensor) -> None:
        super().__init__()
        factor = precision_factor.detach().float()
        projected = means.detach().float() @ factor
        self.register_buffer("factor", factor)
        self.register_buffer("projected_means", projected)

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        # Differences, not ||z||^2 - 2 z.m + ||m||^2: the expansion cancels catastrophically in float32.
        diff = torch.matmul(embedding, self.factor).unsqueeze(1) - self.projected_means.unsqueeze(0)
        return -(diff * diff).sum(dim=2).min(dim=1)[0]


def scorer(detector: str, weight: torch.Tensor, fitted: dict | None = None) -> nn.Module:
    """The known_score module for a detector name; fitted: {"means", "precision_factor"} for mahalanobis."""
    if detector == "max_cosine":
        return MaxCosine(weight)
    if detector == "mahalanobis":
        if not fitted:
            raise ValueError("the mahalanobis detector needs fitted class means and a precision factor")
        return Mahalanobis(torch.as_tensor(fitted["means"]), torch.as_tensor(fitted["precision_factor"]))
    raise ValueError(f"unknown in-graph detector {detector!r}; expected max_cosine or mahalanobis")


class InferenceModule(nn.Module):
    """image uint8 [N, 1, 28, 28] -> (logits fp32 [N, C], embedding fp32 [N, D], known_score fp32 [N])."""

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, scale: float, mean: float, std: float,
                 known_score: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval()
        out_features, in_features = weight.shape
        self.classifier = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
        # (x * scale - mean) / std == x * gain + offset
        self.register_buffer("gain", torch.tensor(scale / std, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(-mean / std, dtype=torch.float32))
        self.known_score = known_score if known_score is not None else MaxCosine(weight)
        self.register_buffer("min_ink", torch.tensor(MIN_INK, dtype=torch.float32))
        self.register_buffer("no_ink_score", torch.tensor(NO_INK_SCORE, dtype=torch.float32))
        self.requires_grad_(False)  # an inference graph: no autograd bookkeeping in any runtime
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.to(torch.float32) * self.gain + self.offset
        embedding = self.backbone(x)
        logits = self.classifier(embedding)
        score = self.known_score(logits, embedding)
        # No ink, no digit: a (near-)blank input scores NO_INK_SCORE, below any threshold, whatever the net says.
        ink = image.to(torch.float32).sum(dim=(1, 2, 3)) * (1.0 / 255.0)
        return logits, embedding, torch.where(ink >= self.min_ink, score, self.no_ink_score.expand_as(score))


def build_inference_module(model: nn.Module, normalization: dict, detector: str = "max_cosine",
                           fitted: dict | None = None) -> InferenceModule:
    """Fold a trained LSoftmaxNet (backbone + LSoftmaxLinear head) into an InferenceModule whose known_score is
    `detector` (fitted: its parameters, for mahalanobis)."""
    weight = model.head.weight.detach()
    return InferenceModule(
        model.backbone,
        weight,
        float(normalization.get("scale", 1.0 / 255.0)),
        float(normalization["mean"]),
        float(normalization["std"]),
        scorer(detector, weight, fitted),
    )
