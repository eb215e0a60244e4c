"""The nets: a backbone that emits the embedding, followed by the L-Softmax head that owns W.

- `paper`: Table 1's MNIST net (conv 3x3/64; three stages of [3x3/64]x3 + 2x2 max-pool; FC 256).
- `vis`:   the Fig. 2 net (three stages of [5x5 conv]x2 with 32/64/128 channels + pool; FC 2).
- `fast`:  a 5-conv 32/64-channel net that trains to >= 99.3% on a 2-core CPU in a few minutes.

Every net has `forward(x, target=None) -> logits` (rows past len(target): training negatives) and `embed(x) -> features`; `build_model(name, margin)`
builds one by name. Inputs are normalised float images [N, 1, 28, 28].
"""

from __future__ import annotations

import torch
from torch import nn

from training.lsoftmax import LSoftmaxLinear

__all__ = ["LSoftmaxNet", "build_model", "MODEL_NAMES", "embedding_dim"]


def _conv_bn_prelu(in_ch: int, out_ch: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.PReLU(out_ch),
    ]


def _stage(in_ch: int, out_ch: int, kernel: int, convs: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += _conv_bn_prelu(in_ch if i == 0 else out_ch, out_ch, kernel)
    return layers + [nn.MaxPool2d(2)]


def _paper_backbone() -> nn.Sequential:
    # 28 -> 14 -> 7 -> 3 spatially; 64 * 3 * 3 = 576 into FC 256.
    layers = _conv_bn_prelu(1, 64, 3)
    for _ in range(3):
        layers += _stage(64, 64, 3, 3)
    layers += [nn.Flatten(), nn.Linear(576, 256, bias=False), nn.BatchNorm1d(256)]
    return nn.Sequential(*layers)


def _vis_backbone() -> nn.Sequential:
    # 28 -> 14 -> 7 -> 3; 128 * 3 * 3 = 1152 into a 2-D feature (no nonlinearity after it, as in Fig. 2).
    layers = _stage(1, 32, 5, 2) + _stage(32, 64, 5, 2) + _stage(64, 128, 5, 2)
    layers += [nn.Flatten(), nn.Linear(1152, 2)]
    return nn.Sequential(*layers)


def _fast_backbone() -> nn.Sequential:
    # 28 -> 14 -> 7 -> 3; 64 * 3 * 3 = 576 into a 128-D feature.
    layers = _stage(1, 32, 3, 2) + _stage(32, 64, 3, 2) + _stage(64, 64, 3, 1)
    layers += [nn.Flatten(), nn.Linear(576, 128, bias=False), nn.BatchNorm1d(128)]
    return nn.Sequential(*layers)


_BACKBONES = {"paper": (_paper_backbone, 256), "vis": (_vis_backbone, 2), "fast": (_fast_backbone, 128)}
MODEL_NAMES = tuple(_BACKBONES)


def embedding_dim(name: str) -> int:
    return _BACKBONES[name][1]


class LSoftmaxNet(nn.Module):
    """backbone (image -> embedding) + LSoftmaxLinear head (embedding -> logits)."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int, margin: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LSoftmaxLinear(embedding_dim, num_classes, margin)
        self._he_init()

    def _he_init(self) -> None:
        # He init for the conv/FC layers; the head initialises itself.
        for module in self.backbone.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="leaky_relu", a=0.25)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, x):
        return self.backbone(x)

    def forward(self, x, target=None):
        """Logits [N, C]. target: the labels of the first len(target) rows (margin logits in training); any rows
        after them are training negatives, which belong to no class and get the plain logits W.x."""
        features = self.backbone(x)
        # The head runs in fp32 outside autocast: cos(m theta) is a degree-m polynomial that bf16 rounds
        # badly, and under CPU autocast the layer would get bf16 logits beside fp32 margins.
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if target is None or target.shape[0] == features.shape[0]:
                return self.head(features, target)
            known = target.shape[0]
            return torch.cat([self.head(features[:known], target), self.head(features[known:])])


def build_model(name: str, margin: int, num_classes: int = 10) -> LSoftmaxNet:
    """Build a net by name; raises ValueError naming the choices for an unknown name or bad margin."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
    factory, dim = _BACKBONES[name]
    return LSoftmaxNet(factory(), dim, num_classes, margin)
