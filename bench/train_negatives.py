"""What the training negatives (with the capture augmentation) cost the fast recipe: training steps with and without them, and making the pool.

    python -m bench.train_negatives [--margin 4 --batch-size 128 --ratio 0.25 --iters 10 --repeats 5 --pool 2000]

A step is what training.train does per iteration: the capture augmentation (with negatives), forward (L-Softmax
margin logits for the digits; plain logits for the negatives after them), loss (plus the negatives' uniform-target loss), backward, SGD update, channels_last
as the recipe trains. The two steps are interleaved round-robin in one process (this machine is shared and noisy)
and their median times compared; making the pool is timed as reading the fonts (once per run) plus `--pool` images scaled to the run's. The whole
run's ratio adds the pool to the steps of the run (`--epochs` x `--iterations`); evaluation, the same in both,
is left out, so the ratio is an upper bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from training.augment import capture_like
from training.models import build_model
from training.negatives import negative_images, read_stroke_fonts
from training.outlier_exposure import pool_size, uniform_target_loss


def _step_fn(net, with_negatives: int):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)

    def step(x, y, negatives):
        batch = capture_like(torch.cat([x, negatives]), generator) if with_negatives else x
        logits = net(batch.contiguous(memory_format=torch.channels_last), y)
        loss = F.cross_entropy(logits[:len(y)], y)
        if with_negatives:
            loss = loss + 0.5 * uniform_target_loss(logits[len(y):])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _seconds(step, x, y, negatives, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step(x, y, negatives)
    return (time.perf_counter() - start) / iters


def run(margin: int, batch_size: int, ratio: float, iters: int, repeats: int, pool: int, epochs: int,
        iterations: int) -> dict:
    torch.manual_seed(0)
    per_batch = max(1, round(batch_size * ratio))
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    negatives = torch.randn(per_batch, 1, 28, 28)
    steps = {}
    for name, flag in (("digits", 0), ("with_negatives", 1)):
        net = build_model("fast", margin).to(memory_format=torch.channels_last).train()
        steps[name] = _step_fn(net, flag)
        _seconds(steps[name], x, y, negatives, 2)  # warm-up
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(_seconds(step, x, y, negatives, iters))
    digits = np.zeros((200, 1, 28, 28), np.uint8)
    digits[:, 0, 8:20, 12:16] = 255
    labels = np.arange(200) % 2
    started = time.perf_counter()
    read_stroke_fonts()
    fonts_seconds = time.perf_counter() - started
    started = time.perf_counter()
    negative_images(pool, 0, digits, labels)
    per_image = (time.perf_counter() - started) / pool
    t_digits, t_negatives = (statistics.median(samples[k]) for k in ("digits", "with_negatives"))
    run_pool = pool_size(iterations, per_batch)
    plain = epochs * iterations * t_digits
    pool_seconds = fonts_seconds + run_pool * per_image
    with_negatives = epochs * iterations * t_negatives + pool_seconds
    return {"batch_size": batch_size, "per_batch": per_batch, "step_digits_ms": 1e3 * t_digits,
            "step_with_negatives_ms": 1e3 * t_negatives, "step_ratio": t_negatives / t_digits,
            "pool_images": run_pool, "pool_ms_per_image": 1e3 * per_image, "fonts_seconds": fonts_seconds,
            "pool_seconds": pool_seconds,
            "run_seconds_digits": plain, "run_seconds_with_negatives": with_negatives,
            "run_ratio": with_negatives / plain, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--margin", type=int, default=4, help="L-Softmax margin")
    p.add_argument("--batch-size", type=int, default=128, help="digits per step (the fast recipe's)")
    p.add_argument("--ratio", type=float, default=0.25, help="negatives per digit (training's --negative-ratio)")
    p.add_argument("--iters", type=int, default=10, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per step kind (median reported)")
    p.add_argument("--pool", type=int, default=2000, help="negatives made to time the generator")
    p.add_argument("--epochs", type=int, default=2, help="the run's epochs (the fast recipe's)")
    p.add_argument("--iterations", type=int, default=430, help="steps per epoch (55,000 digits at batch 128)")
    args = p.parse_args(argv)
    r = run(args.margin, args.batch_size, args.ratio, args.iters, args.repeats, args.pool, args.epochs,
            args.iterations)
    print(f"fast m={args.margin}, batch {r['batch_size']} + {r['per_batch']} negatives, {r['threads']} threads")
    print(f"step: digits {r['step_digits_ms']:.1f} ms, with negatives {r['step_with_negatives_ms']:.1f} ms "
          f"({r['step_ratio']:.3f}x)")
    print(f"pool: fonts read in {r['fonts_seconds']:.1f} s, {r['pool_images']} negatives at "
          f"{r['pool_ms_per_image']:.2f} ms = {r['pool_seconds']:.1f} s")
    print(f"run ({args.epochs} x {args.iterations} steps, evaluation left out): {r['run_seconds_digits']:.0f} s -> "
          f"{r['run_seconds_with_negatives']:.0f} s ({r['run_ratio']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
