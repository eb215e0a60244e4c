"""Parity checks run before an export reports success.

Eager inference module vs TorchScript (saved and reloaded) vs ONNX Runtime, at batch sizes 1 and 64
and over a whole evaluation set: max |diff| of logits, embeddings and known_score, top-1 agreement (differing
images listed), and each runtime's accuracy against the labels, which must reproduce the checkpoint's own figure
(accuracy_mismatch). The fold itself is checked against the unfolded net in eval mode (same logits from
normalised pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from export.graphs import run_onnx, run_torchscript
from serving.repository.format import ALL_OUTPUTS
from training.data import normalize

__all__ = ["ParityError", "ParityReport", "check_parity", "parity_problems", "TOLERANCE", "ACCURACY_SLACK_IMAGES",
           "accuracy_mismatch"]

# Max |difference| allowed, relative to the largest |value| of that output (absolute where that is below 1):
# float32 runtimes differ by rounding, which grows with the size of the activations (a deep net's logits
# reach the hundreds), while a real export bug is as large as the outputs themselves.
TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """An exported graph disagrees with eager PyTorch beyond the tolerance."""


@dataclass
class ParityReport:
    tolerance: float = TOLERANCE
    fold_max_abs_diff: float = 0.0
    fold_scale: float = 1.0  # largest |logit| of the unfolded net on the probe images (at least 1)
    batches: dict = field(default_factory=dict)  # "bs1", "bs64", "full" -> {runtime: {logits, embedding, top1}}
    accuracy: dict = field(default_factory=dict)  # runtime -> % correct over the evaluation set
    disagreements: dict = field(default_factory=dict)  # runtime -> image indices whose top-1 differs from eager
    images: int = 0

    def as_dict(self) -> dict:
        return {"tolerance": self.tolerance, "fold_max_abs_diff": self.fold_max_abs_diff,
                "fold_scale": self.fold_scale, "batches": self.batches,
                "accuracy": self.accuracy, "disagreements": self.disagreements, "images": self.images}

    def lines(self) -> list[str]:
        out = [f"fold: max |eager inference logits - unfolded net eval logits| = {self.fold_max_abs_diff:.3g}"]
        for name, runtimes in self.batches.items():
            for runtime, stats in runtimes.items():
                out.append(f"{name:>5} {runtime:<11} vs eager: max|dlogits| {stats['logits']:.3g} "
                           f"(of {stats['logits_scale']:.3g})  max|dembedding| {stats['embedding']:.3g} "
                           f"(of {stats['embedding_scale']:.3g})  max|dknown_score| {stats.get('known_score', 0):.3g} "
                           f"(of {stats.get('known_score_scale', 1):.3g})  top-1 agreement {stats['top1']:.2f}%")
        acc = "  ".join(f"{k} {v:.2f}%" for k, v in self.accuracy.items())
        out.append(f"accuracy over {self.images} images: {acc}")
        return out


def _batched(fn, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, ...]:
    parts = [fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(len(parts[0])))


def _scale(values: np.ndarray) -> float:
    return max(1.0, float(np.abs(values).max()))


def _compare(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...]) -> dict:
    """Per output (by its tensor name): max abs difference and the reference's scale; top-1 agreement."""
    return {
        **{name: float(np.abs(r - g).max()) for name, r, g in zip(ALL_OUTPUTS, ref, got)},
        **{f"{name}_scale": _scale(r) for name, r in zip(ALL_OUTPUTS, ref)},
        "top1": 100.0 * float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
    }


@torch.no_grad()
def check_parity(net, inference, scripted, session, images: torch.Tensor, labels: torch.Tensor | None,
                 normalization: dict, batch_size: int = 500) -> ParityReport:
    """Run every comparison; raise ParityError listing what failed, else return the report."""
    report = ParityReport(images=len(images))
    runtimes = {
        "torchscript": lambda x: run_torchscript(scripted, x),
        "onnxruntime": lambda x: run_onnx(session, x),
    }

    def eager(x):
        return tuple(out.numpy() for out in inference(x))

    # The fold: plain logits of the trained net (margin layer in eval mode) from normalised pixels.
    probe = images[:256]
    unfolded = net(normalize(probe, normalization["mean"], normalization["std"])).numpy()
    report.fold_max_abs_diff = float(np.abs(unfolded - eager(probe)[0]).max())
    report.fold_scale = _scale(unfolded)

    for name, subset, bs in (("bs1", images[:1], 1), ("bs64", images[:64], 64), ("full", images, batch_size)):
        outputs = {"eager": _batched(eager, subset, bs), **{rt: _batched(fn, subset, bs) for rt, fn in runtimes.items()}}
        report.batches[name] = {rt: _compare(outputs["eager"], outputs[rt]) for rt in runtimes}
    full_outputs = outputs

    if labels is not None:
        y = labels.numpy()
        report.accuracy = {rt: 100.0 * float((out[0].argmax(1) == y).mean()) for rt, out in full_outputs.items()}
    eager_top1 = full_outputs["eager"][0].argmax(1)
    for rt in runtimes:
        differing = np.nonzero(full_outputs[rt][0].argmax(1) != eager_top1)[0]
        if len(differing):
            report.disagreements[rt] = differing.tolist()[:50]

    problems = parity_problems(report)
    if problems:
        raise ParityError("; ".join(problems))
    return report


def parity_problems(report: ParityReport) -> list[str]:
    """What in the report is beyond the tolerance, one phrase each (empty when the export is sound)."""
    problems = []
    if report.fold_max_abs_diff > report.tolerance * report.fold_scale:
        problems.append(f"fold differs from the unfolded net by {report.fold_max_abs_diff:.3g} "
                        f"> {report.tolerance} x {report.fold_scale:.3g}")
    for name, per_runtime in report.batches.items():
        for rt, stats in per_runtime.items():
            bad = [f"{out} {stats[out]:.3g} > {report.tolerance} x {stats[out + '_scale']:.3g}"
                   for out in ALL_OUTPUTS if out in stats and stats[out] > report.tolerance * stats[out + "_scale"]]
            if bad:
                problems.append(f"{rt} at {name}: max diff " + ", ".join(bad))
    for rt, idx in report.disagreements.items():
        problems.append(f"{rt} top-1 differs from eager on images {idx}")
    return problems


# Test images by which the exported graphs' accuracy (float32, CPU) may differ from the checkpoint's own
# figure, by where that figure was measured: CPU float32 is exact; CUDA's float32 convolutions (TF32 off for
# scoring) sum in another order; checkpoints from before "evaluated_on" existed may have been scored under
# bf16 autocast on a GPU.
ACCURACY_SLACK_IMAGES = {"cpu": 0, "cuda": 5, "unrecorded": 10}


def _scored_on(config: dict) -> str:
    if config.get("evaluated_on") in ACCURACY_SLACK_IMAGES:
        return config["evaluated_on"]
    return "cpu" if config.get("train_args", {}).get("device") == "cpu" else "unrecorded"


def accuracy_mismatch(accuracy: dict, recorded: float, config: dict, images: int) -> dict:
    """Runtimes whose accuracy on the checkpoint's own test images is off its recorded figure: the graphs
    must get the same count right, give or take the borderline images another device's arithmetic flips."""
    tolerance = (ACCURACY_SLACK_IMAGES[_scored_on(config)] + 0.5) * 100.0 / images
    return {rt: acc for rt, acc in accuracy.items() if abs(acc - recorded) > tolerance}
