"""The inference module: raw uint8 pixels in, (logits, embedding, known_score) out, with the margin folded away.

In eval mode L-Softmax is a bias-free linear map (the margin only ever touched the target logit in
training), so the served graph is backbone -> nn.Linear(W, bias=False). The pixel normalisation
(x / 255 - mean) / std is folded in front as one affine map, so every runtime gets the same answer
from the same raw pixels. `known_score` (higher = more digit-like) is the open-set detector the export chose
(export.open_set), computed inside the graph so Triton and KServe users get it too: max cosine between the
embedding and the class weights; the negated class-conditional Mahalanobis distance of the embedding with a
shared covariance (Lee et al. 2018); or that distance at every stage of the net (the channel means after each
pooling stage, and the embedding), each standardised by its spread on held-out digits and summed, which sees
what the embedding alone has squeezed out (texture, stroke statistics, blank pages).
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["InferenceModule", "build_inference_module", "MaxCosine", "Mahalanobis", "MultiLayerMahalanobis",
           "scorer", "split_stages", "stage_features"]


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

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
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

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """min_c of the squared Mahalanobis distance to the class means, [N]."""
        # Differences, not ||z||^2 - 2 z.m + ||m||^2: the expansion cancels catastrophically in float32.
        diff = torch.matmul(features, self.factor).unsqueeze(1) - self.projected_means.unsqueeze(0)
        return (diff * diff).sum(dim=2).min(dim=1)[0]

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        return -self.distance(embedding)


class MultiLayerMahalanobis(nn.Module):
    """-sum_l (d_l - center_l) / scale_l over the stage taps and the embedding, d_l each one's Mahalanobis distance
    (fitted as Mahalanobis is), center/scale its median and spread on held-out digits so that no layer dominates."""

    def __init__(self, layers: list[dict]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Mahalanobis(torch.as_tensor(f["means"]), torch.as_tensor(f["precision_factor"]))
                                    for f in layers)
        self.register_buffer("center", torch.tensor([float(f["center"]) for f in layers], dtype=torch.float32))
        self.register_buffer("inverse_scale", torch.tensor([1.0 / float(f["scale"]) for f in layers],
                                                           dtype=torch.float32))

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        features = taps + [embedding]
        total = torch.zeros_like(embedding[:, 0])
        for i, layer in enumerate(self.layers):
            total = total + (layer.distance(features[i]) - self.center[i]) * self.inverse_scale[i]
        return -total


def scorer(detector: str, weight: torch.Tensor, fitted: dict | None = None) -> nn.Module:
    """The known_score module for a detector name; fitted: {"means", "precision_factor"} for mahalanobis,
    {"layers": [{"means", "precision_factor", "center", "scale"}, ...]} (taps first, embedding last) for
    multilayer_mahalanobis."""
    if detector == "max_cosine":
        return MaxCosine(weight)
    if detector == "mahalanobis":
        if not fitted:
            raise ValueError("the mahalanobis detector needs fitted class means and a precision factor")
        return Mahalanobis(torch.as_tensor(fitted["means"]), torch.as_tensor(fitted["precision_factor"]))
    if detector == "multilayer_mahalanobis":
        if not fitted or not fitted.get("layers"):
            raise ValueError("the multilayer_mahalanobis detector needs fitted layers")
        return MultiLayerMahalanobis(fitted["layers"])
    raise ValueError(f"unknown in-graph detector {detector!r}; expected max_cosine, mahalanobis or "
                     "multilayer_mahalanobis")


def split_stages(backbone: nn.Sequential) -> list[nn.Sequential]:
    """The backbone cut after each MaxPool2d: running the pieces in turn is running the backbone, and the output
    of every piece but the last is a stage's feature map [N, C, H, W] (the last gives the embedding)."""
    stages, current = [], []
    for layer in backbone:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    return stages + [nn.Sequential(*current)] if current else stages


@torch.no_grad()
def stage_features(module: "InferenceModule", image: torch.Tensor) -> list[torch.Tensor]:
    """The stage taps (channel means after each pooling stage) and the embedding, as the graph computes them:
    what multilayer_mahalanobis is fitted on."""
    taps, embedding = module.features(image.to(torch.float32) * module.gain + module.offset)
    return taps + [embedding]


class InferenceModule(nn.Module):
    """image uint8 [N, 1, 28, 28] -> (logits fp32 [N, C], embedding fp32 [N, D], known_score fp32 [N])."""

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, scale: float, mean: float, std: float,
                 known_score: nn.Module | None = None) -> None:
        super().__init__()
        self.stages = nn.ModuleList(split_stages(copy.deepcopy(backbone).eval()))
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

    def features(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """(channel means of every stage's output but the last, the embedding) of normalised pixels x."""
        taps: List[torch.Tensor] = []
        h = x
        for stage in self.stages:
            h = stage(h)
            if h.dim() == 4:
                taps.append(h.mean(dim=(2, 3)))
        return taps, h

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.to(torch.float32) * self.gain + self.offset
        taps, embedding = self.features(x)
        logits = self.classifier(embedding)
        score = self.known_score(logits, embedding, taps)
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
