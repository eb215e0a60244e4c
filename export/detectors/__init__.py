"""The open-set detectors: one table, one object per detector (export.detectors.base.Detector).

    detector = get("multilayer_mahalanobis")       # ValueError listing REGISTRY's names for an unknown one
    params = detector.fit(FitData(head, parts={"stats": (features, labels), ...}))
    scores = detector.score(features, params, head)  # numpy reference, float64 [N]
    module = detector.module(params, head)           # known_score in the graph (in_graph detectors)

To add a detector: in a module here, make an Unfitted(name, description, score, module) when it fits nothing, or
subclass Detector (name, description, split/fits_on for the held-out parts it fits on, fit/score/module/summary);
then list it in REGISTRY. The export's --detector choices, its fit and the evaluation all read this table.
"""

from __future__ import annotations

from export.detectors.base import THRESHOLD, Detector, Features, FitData, Head, Unfitted
from export.detectors.embedding import FEATURE_NORM, MAX_COSINE
from export.detectors.learned import LEARNED
from export.detectors.logits import ENERGY, MAX_LOGIT, MSP
from export.detectors.mahalanobis import MAHALANOBIS, MULTILAYER_MAHALANOBIS

__all__ = ["REGISTRY", "table", "AUTO_DETECTOR", "DEFAULT_DETECTOR", "DETECTOR_WITH_NEGATIVES", "detector_for", "UNFITTED_DETECTOR", "IN_GRAPH", "get", "Detector", "Unfitted",
           "Features", "FitData", "Head", "THRESHOLD"]


def table(*detectors: Detector) -> dict[str, Detector]:
    """name -> detector; a detector without a name or description, or a name twice, is a ValueError."""
    out: dict[str, Detector] = {}
    for detector in detectors:
        if not detector.name or not detector.description or detector.name in out:
            raise ValueError(f"{detector!r}: every detector needs a description and a name of its own")
        out[detector.name] = detector
    return out


REGISTRY = table(MULTILAYER_MAHALANOBIS, MAHALANOBIS, MAX_COSINE, LEARNED, MSP, ENERGY, MAX_LOGIT, FEATURE_NORM)
# Chosen by measurement (docs/open_set.md): for a net trained beside negatives (--negatives on, the default recipe)
# the learned combination, which weighs the logits' scores the negatives taught; for a net trained on digits alone
# the stage distances, which are all it has. `auto` picks by the checkpoint's training flags.
AUTO_DETECTOR = "auto"
DEFAULT_DETECTOR = "multilayer_mahalanobis"  # for a net trained on digits alone
DETECTOR_WITH_NEGATIVES = "learned"  # for a net trained beside negatives
UNFITTED_DETECTOR = "max_cosine"  # nothing to fit: what a graph without held-out images to fit on ships
IN_GRAPH = tuple(name for name, d in REGISTRY.items() if d.in_graph)  # what --detector may ship as known_score


def detector_for(ckpt: dict) -> str:
    """The detector `auto` means for this checkpoint: DETECTOR_WITH_NEGATIVES when it was trained beside
    negatives, else DEFAULT_DETECTOR."""
    trained_with = ckpt.get("config", {}).get("train_args", {}).get("negatives", "off")
    return DETECTOR_WITH_NEGATIVES if trained_with == "on" else DEFAULT_DETECTOR


def get(name: str) -> Detector:
    """The registered detector `name`; ValueError naming every registered one otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(REGISTRY)}") from None
