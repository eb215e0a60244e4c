"""What a detector is: one object owning a known_score's name, fit, numpy reference and in-graph module.

A detector reads the graph's outputs for N images (`Features`: logits, embedding and the stage taps, numpy) and
gives one score per image, higher = more digit-like. `Head` is what every detector may read besides the images:
the classifier's W and the calibrated softmax temperature. The export deals the held-out digits into the parts the
detector's `split` names, fits it on the parts it names in `fits_on` (`FitData`), builds its torch module, which
the graph appends as `known_score`, and picks the threshold on the THRESHOLD part (docs/architecture.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

__all__ = ["EPS", "THRESHOLD", "Features", "Head", "FitData", "Detector", "Unfitted"]

EPS = 1e-12
THRESHOLD = "threshold"  # the split part the acceptance threshold is picked on


@dataclass(frozen=True)
class Features:
    """The graph's outputs for N images as numpy: logits [N, C], embedding [N, D], and the channel means after
    each pooling stage (taps, [N, C_l] each; empty when only logits and embedding are known)."""

    logits: np.ndarray
    embedding: np.ndarray
    taps: tuple[np.ndarray, ...] = ()

    @property
    def layers(self) -> tuple[np.ndarray, ...]:
        """The stage taps then the embedding: the layers the Mahalanobis detectors measure."""
        return (*self.taps, self.embedding)

    def rows(self, index) -> "Features":
        return Features(self.logits[index], self.embedding[index], tuple(t[index] for t in self.taps))

    def __len__(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class Head:
    """weight: the classifier's W [C, D] (logits = embedding @ W^T); temperature: the calibrated softmax
    temperature (1 when not fitted)."""

    weight: np.ndarray
    temperature: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class FitData:
    """What a fit reads: the held-out digits of the parts the detector fits on, the head, and, for detectors that
    ask for them, the negatives' features (images that are not digits)."""

    head: Head
    parts: dict[str, tuple[Features, np.ndarray]] = field(default_factory=dict)  # part -> (features, labels)
    negatives: Features | None = None

    def part(self, name: str) -> tuple[Features, np.ndarray]:
        if name not in self.parts:
            raise ValueError(f"no held-out part {name!r} to fit on (have {sorted(self.parts)})")
        return self.parts[name]


class Detector:
    """One known_score. Subclasses set the class attributes and override what applies:

    - `fit(data) -> params`: arrays and numbers, from held-out digits (default: nothing to fit), and from
      negatives when `negatives_needed` asks for them;
    - `score(features, params, head) -> float64 [N]`: the numpy reference, what evaluation measures with;
    - `module(params, head) -> nn.Module` with forward(logits, embedding, taps) -> [N] (float32): the graph's;
    - `summary(params) -> dict`: what the manifest's open_set record says of the fit (JSON-ready).

    `split` is the cycle the held-out rows are dealt along (row i goes to split[i % len(split)]), so its
    proportions are the parts' and every part spans the whole held-out range (which is in MNIST's order); the
    threshold is picked on the THRESHOLD part; `fits_on` names the parts the fit is given, the only held-out images
    it sees.
    """

    name: str = ""
    description: str = ""
    in_graph: bool = True
    split: tuple[str, ...] = (THRESHOLD,)
    fits_on: tuple[str, ...] = ()

    def negatives_needed(self, rows: dict[str, np.ndarray]) -> tuple[int, np.ndarray] | None:
        """None, or (how many negatives the fit wants, the held-out rows whose digits its hard negatives may be
        made from), given split_rows' parts."""
        return None

    def fit(self, data: FitData) -> dict:
        return {}

    def score(self, features: Features, params: dict, head: Head) -> np.ndarray:
        raise NotImplementedError

    def module(self, params: dict, head: Head) -> nn.Module:
        raise ValueError(f"the graphs cannot compute the {self.name} detector; it is measured offline only")

    def summary(self, params: dict) -> dict:
        return {}

    def split_rows(self, count: int) -> dict[str, np.ndarray]:
        """part -> the held-out row indices dealt to it (disjoint, together all `count` rows)."""
        cycle = np.arange(count) % len(self.split)
        rows = {part: np.flatnonzero(np.isin(cycle, [i for i, p in enumerate(self.split) if p == part]))
                for part in dict.fromkeys(self.split)}
        empty = [part for part, r in rows.items() if len(r) == 0]
        if empty:
            raise ValueError(f"{count} held-out images are too few for the {self.name} detector's parts {empty}")
        return rows

    def __repr__(self) -> str:
        return f"<detector {self.name}>"


class Unfitted(Detector):
    """A detector with nothing to fit: its numpy score(features, head), and module(head) when the graphs can
    compute it (without one it is a score the evaluation measures, not one the graphs ship)."""

    def __init__(self, name: str, description: str, score, module=None) -> None:
        self.name, self.description, self.in_graph = name, description, module is not None
        self._score, self._module = score, module

    def score(self, features: Features, params: dict, head: Head) -> np.ndarray:
        return self._score(features, head)

    def module(self, params: dict, head: Head) -> nn.Module:
        return self._module(head) if self._module is not None else super().module(params, head)
