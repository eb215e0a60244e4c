"""Forward+backward time of LSoftmaxLinear vs nn.Linear + cross-entropy vs PML's LargeMarginSoftmaxLoss.

    python -m bench.layer [--batch 256 --dim 256 --classes 10 --margins 1,2,3,4 --device cpu --repeats 7]
    python -m bench.layer --baseline-rev a329c63   # adds the layer as it was at that git revision

All run side by side in one process on the same data, interleaved round-robin so machine noise
hits them alike; each figure is the median over repeats of the mean time per step, and the table
gives the ratios to the plain layer and to PML at the same margin (and to the baseline revision).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.lsoftmax import LSoftmaxLinear


def _plain_step(layer, x, y):
    loss = F.cross_entropy(layer(x), y)
    loss.backward()


def _lsoftmax_step(layer, x, y):
    loss = F.cross_entropy(layer(x, y), y)
    loss.backward()


def _pml_step(loss_fn, x, y):
    loss_fn(x, y).backward()


def load_layer_at_revision(rev: str):
    """LSoftmaxLinear from training/lsoftmax.py as committed at git revision `rev`, so a change can be timed
    against its predecessor in the same process."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:training/lsoftmax.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="lsoftmax_baseline_")) / "lsoftmax_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lsoftmax_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.LSoftmaxLinear


def _time(step, module, x, y, iters: int, device) -> float:
    """Mean seconds per step over `iters` steps (after a sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        module.zero_grad(set_to_none=True)
        x.grad = None
        step(module, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def run(batch: int, dim: int, classes: int, margins: list[int], device: torch.device, repeats: int,
        iters: int, include_pml: bool = True, baseline=None) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device=device, requires_grad=True)
    y = torch.randint(0, classes, (batch,), device=device)
    rows = []
    for m in margins:
        plain = nn.Linear(dim, classes, bias=False).to(device)
        ours = LSoftmaxLinear(dim, classes, m).to(device).train()
        ours.beta.fill_(0.0)
        candidates = {"plain": (_plain_step, plain), "lsoftmax": (_lsoftmax_step, ours)}
        if baseline is not None:
            before = baseline(dim, classes, m).to(device).train()
            before.beta.fill_(0.0)
            candidates["baseline"] = (_lsoftmax_step, before)
        if include_pml:
            from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss

            pml = LargeMarginSoftmaxLoss(num_classes=classes, embedding_size=dim, margin=m).to(device)
            candidates["pml"] = (_pml_step, pml)
        for step, module in candidates.values():  # warm-up
            _time(step, module, x, y, max(3, iters // 10), device)
        samples = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, (step, module) in candidates.items():
                samples[name].append(_time(step, module, x, y, iters, device))
        med = {name: statistics.median(v) for name, v in samples.items()}
        row = {"margin": m, **{f"{k}_us": v * 1e6 for k, v in med.items()},
               "vs_plain": med["lsoftmax"] / med["plain"]}
        if include_pml:
            row["vs_pml"] = med["lsoftmax"] / med["pml"]
        if baseline is not None:
            row["baseline_vs_plain"] = med["baseline"] / med["plain"]
            row["vs_baseline"] = med["lsoftmax"] / med["baseline"]
        rows.append(row)
    return rows


def format_table(rows: list[dict], baseline_label: str = "baseline") -> str:
    has_pml = "pml_us" in rows[0]
    has_base = "baseline_us" in rows[0]
    head = "| m | nn.Linear+CE µs | LSoftmaxLinear µs |" + (" PML µs |" if has_pml else "") + " ours / plain |" + (
        " ours / PML |" if has_pml else "") + (
        f" {baseline_label} µs | {baseline_label} / plain | ours / {baseline_label} |" if has_base else "")
    sep = "|---" * (head.count("|") - 1) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [str(r["margin"]), f"{r['plain_us']:.0f}", f"{r['lsoftmax_us']:.0f}"]
        if has_pml:
            cells.append(f"{r['pml_us']:.0f}")
        cells.append(f"{r['vs_plain']:.2f}×")
        if has_pml:
            cells.append(f"{r['vs_pml']:.2f}×")
        if has_base:
            cells += [f"{r['baseline_us']:.0f}", f"{r['baseline_vs_plain']:.2f}×", f"{r['vs_baseline']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="batch size B")
    p.add_argument("--dim", type=int, default=256, help="feature dimension D")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--margins", default="1,2,3,4", help="comma-separated margins")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per candidate (median reported)")
    p.add_argument("--iters", type=int, default=200, help="steps per timed round")
    p.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning")
    p.add_argument("--baseline-rev", default=None,
                   help="also time LSoftmaxLinear as committed at this git revision (a before/after column)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    baseline = load_layer_at_revision(args.baseline_rev) if args.baseline_rev else None
    rows = run(args.batch, args.dim, args.classes, [int(m) for m in args.margins.split(",")], device,
               args.repeats, args.iters, include_pml=not args.no_pml, baseline=baseline)
    print(f"LSoftmaxLinear forward+backward, B={args.batch} D={args.dim} C={args.classes}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(rows, f"@{args.baseline_rev}" if args.baseline_rev else "baseline"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
