"""Fig. 2-style scatter plots of test-set features, coloured by class.

    python -m training.visualize runs/v4/best.pt --out runs/v4/features.png
    python -m training.visualize --embeddings embeddings.npy --out embeddings.png   # from the gRPC client

2-D features (the `vis` net) are drawn as they are, which is what the paper's Fig. 2 shows; wider
features are projected onto their first two principal components.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import CheckpointError, load_checkpoint, rebuild_model
from training.data import DataError, normalize, load_split, prepare_mnist

__all__ = ["compute_features", "project_2d", "plot_features", "plot_checkpoint_features", "plot_grid"]


@torch.no_grad()
def compute_features(model, images: torch.Tensor, device="cpu", batch_size: int = 1000) -> np.ndarray:
    """Embeddings [N, D] of uint8 images [N, 1, 28, 28] with the net in eval mode."""
    model.eval()
    feats = [model.embed(normalize(images[i:i + batch_size]).to(device)).float().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats).numpy()


def project_2d(features: np.ndarray) -> tuple[np.ndarray, str]:
    if features.shape[1] == 2:
        return features, "feature"
    centred = features - features.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PC"


def _scatter(ax, features: np.ndarray, labels: np.ndarray, title: str, max_points: int = 10000) -> None:
    xy, axis_name = project_2d(features)
    xy, labels = xy[:max_points], labels[:max_points]
    cmap = __import__("matplotlib").colormaps["tab10"]
    for digit in range(10):
        sel = labels == digit
        ax.scatter(xy[sel, 0], xy[sel, 1], s=1.5, color=cmap(digit), label=str(digit), rasterized=True)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.set_aspect("equal", adjustable="datalim")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_features(features: np.ndarray, labels, path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    _scatter(ax, features, np.asarray(labels), title)
    ax.legend(markerscale=6, fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_grid(panels: list[tuple[np.ndarray, np.ndarray, str]], path, columns: int = 4) -> Path:
    """One figure with a panel per (features, labels, title), e.g. m = 1..4 side by side."""
    plt = _pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (features, labels, title) in zip(axes.flat, panels):
        _scatter(ax, features, np.asarray(labels), title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, markerscale=6, loc="lower center", ncol=10, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_checkpoint_features(model, images, labels, path, device="cpu", title: str = "") -> Path:
    return plot_features(compute_features(model, images, device), labels.numpy(), path, title)


def _plot_embeddings_file(path: Path, out: str | None) -> int:
    """Scatter an embeddings .npy with the labels from the client's sidecar JSON (no net needed)."""
    try:
        features = np.load(path, allow_pickle=False)
        sidecar = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {path}: cannot read embeddings and their .json sidecar ({exc})", file=sys.stderr)
        return 1
    labels = sidecar.get("labels")
    if labels is None or len(labels) != len(features) or any(label is None for label in labels):
        print(f"error: {path.with_suffix('.json')}: no label for every embedding", file=sys.stderr)
        return 1
    target = Path(out) if out else path.with_suffix(".png")
    model = sidecar.get("model") or {}
    plot_features(features, np.asarray(labels, dtype=np.int64), target,
                  title=f"{len(features)} served embeddings ({model.get('model_name', 'model')})")
    print(f"wrote {target}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Scatter plot of a checkpoint's test-set features.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a .pt written by python -m training")
    parser.add_argument("--embeddings", default=None,
                        help="plot an OUT.npy written by `python -m serving.client embed` instead (labels from OUT.json)")
    parser.add_argument("--out", default=None, help="PNG path (default: features.png beside the checkpoint)")
    parser.add_argument("--data-dir", default=None, help="existing torchvision-layout MNIST root")
    parser.add_argument("--cache-dir", default=None, help="MNIST cache root")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.embeddings is None):
        parser.error("give either a CHECKPOINT or --embeddings OUT.npy")
    if args.embeddings:
        return _plot_embeddings_file(Path(args.embeddings), args.out)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        model = rebuild_model(ckpt)
        images, labels = load_split(prepare_mnist(args.data_dir, cache_dir=args.cache_dir), train=False)
        cfg = ckpt["config"]
        out = Path(args.out) if args.out else Path(args.checkpoint).with_name("features.png")
        plot_checkpoint_features(model, images, labels, out, title=f"{cfg['model']} m={cfg['margin']}: test features")
    except (CheckpointError, DataError, OSError, ValueError) as exc:  # a runtime failure (2 is for usage)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
