"""Which images the export fits on (the checkpoint's held-out digits) and which it verifies on (the test set).

The fit images are never the test set: the temperature, the detector and its threshold are fitted on the training
images the checkpoint held out (checked against the sha256 it recorded), and the verification reproduces the
checkpoint's test accuracy on the images it was scored on (docs/architecture.md §5, Graphs).
"""

from __future__ import annotations

import torch

from export.errors import ExportError
from serving.repository.format import IMAGE_DIMS

__all__ = ["TRAINING_FIT_COUNT", "fit_set", "verification_set"]

TRAINING_FIT_COUNT = 5000  # --fit-on-training-images: the last this many training images


def fit_set(ckpt: dict, checkpoint, fit_images, fit_labels, fit_on_training_images: bool, data_dir,
            cache_dir) -> tuple[torch.Tensor | None, torch.Tensor | None, dict | None]:
    """The images calibration and the threshold are fitted on, and what they are (for the manifest): the
    checkpoint's held-out split (checked against its sha256), images the caller gives, the last training images
    with --fit-on-training-images, or none (not fitted)."""
    held = ckpt["config"].get("held_out")
    if fit_images is not None:
        return fit_images, fit_labels, {"source": "given by the caller", "count": len(fit_labels)}
    if not held and not fit_on_training_images:
        return None, None, None
    from training.data import load_split, prepare_mnist
    from training.train import held_out_digest

    images, labels = load_split(prepare_mnist(data_dir, cache_dir=cache_dir), train=True)
    if held:
        start, stop = int(held["start"]), int(held["stop"])
        images, labels = images[start:stop], labels[start:stop]
        if len(labels) != stop - start or held_out_digest(images, labels) != held.get("sha256"):
            raise ExportError(f"{checkpoint}: the held-out training images [{start}, {stop}) of this MNIST copy are not "
                              "the ones the checkpoint recorded (sha256 differs); use the run's --data-dir")
        return images, labels, {"source": "held-out training images", "split": "train", "start": start, "stop": stop,
                                "count": stop - start, "sha256": held["sha256"]}
    count = min(TRAINING_FIT_COUNT, len(labels))
    return images[-count:], labels[-count:], {
        "source": "training images the net trained on (--fit-on-training-images; no held-out split recorded)",
        "split": "train", "start": len(labels) - count, "stop": len(labels), "count": count}


def verification_set(images, labels, config: dict, data_dir, cache_dir) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The images to verify on (default: the MNIST test set) and whether they are the set the checkpoint was
    scored on, so that its recorded accuracy must be matched."""
    on_full_test_set = images is None and not config.get("train_args", {}).get("test_subset")
    if images is None:
        from training.data import load_split, prepare_mnist

        images, labels = load_split(prepare_mnist(data_dir, cache_dir=cache_dir), train=False)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_DIMS:
        raise ExportError(f"verification images must be uint8 [N, 1, 28, 28], got {images.dtype} {list(images.shape)}")
    return images, labels, on_full_test_set
