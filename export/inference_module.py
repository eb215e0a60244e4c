"""The inference module: raw uint8 pixels in, (logits, embedding, known_score) out, with the margin folded away.

In eval mode L-Softmax is a bias-free linear map (the margin only ever touched the target logit in
training), so the served graph is backbone -> nn.Linear(W, bias=False). The pixel normalisation
(x / 255 - mean) / std is folded in front as one affine map, so every runtime gets the same answer
from the same raw pixels. `known_score` (higher = more digit-like) is the open-set detector the export chose
(export.detectors builds its module), computed inside the graph so Triton and KServe users get it too; the
backbone runs as its stages in turn so that detectors can read the channel means after each pooling stage.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import nn

from export.detectors import UNFITTED_DETECTOR, Features, Head, get

__all__ = ["InferenceModule", "build_inference_module", "split_stages", "stage_features", "graph_features"]


# Ink below this many full-white pixels' worth is not a digit: every MNIST training digit has at least 19.9
# (measured over the 60,000), an all-black page 0, a 2x2 dot 4. Such inputs get NO_INK_SCORE as known_score.
MIN_INK = 10.0
NO_INK_SCORE = -1.0e6


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


@torch.no_grad()
def graph_features(module: "InferenceModule", images: torch.Tensor, batch_size: int = 1000) -> Features:
    """What the detectors read, as the graph computes it (logits, embedding, stage taps), over images, batched."""
    parts = []
    for start in range(0, len(images), batch_size):
        *taps, embedding = stage_features(module, images[start:start + batch_size])
        parts.append([module.classifier(embedding), embedding, *taps])
    columns = [torch.cat(column).numpy() for column in zip(*parts)]
    return Features(columns[0], columns[1], tuple(columns[2:]))


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
        self.known_score = known_score if known_score is not None else get(UNFITTED_DETECTOR).module(
            {}, Head(weight.detach().numpy()))
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


def build_inference_module(model: nn.Module, normalization: dict, detector: str = UNFITTED_DETECTOR,
                           fitted: dict | None = None, temperature: float = 1.0) -> InferenceModule:
    """Fold a trained LSoftmaxNet (backbone + LSoftmaxLinear head) into an InferenceModule whose known_score is the
    registered `detector` (export.detectors) with its fitted parameters, at the calibrated temperature."""
    weight = model.head.weight.detach()
    return InferenceModule(
        model.backbone,
        weight,
        float(normalization.get("scale", 1.0 / 255.0)),
        float(normalization["mean"]),
        float(normalization["std"]),
        get(detector).module(fitted or {}, Head(weight.numpy(), temperature)),
    )
