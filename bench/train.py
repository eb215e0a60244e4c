"""Training-step throughput of each net: L-Softmax head vs plain softmax head, eager vs channels_last vs compile.

    python -m bench.train [--nets fast,vis,paper --margin 4 --batch-size 256 --modes eager,channels_last
                           --device cpu --iters 10 --repeats 3]

A step is forward + cross-entropy + backward + SGD update on random MNIST-shaped batches. The
softmax head is the same net with margin 1 (exactly softmax cross-entropy on W x), so the ratio
isolates the cost of the margin. Candidates are interleaved round-robin within one process and the
median images/s over repeats is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from training.models import build_model


def _make_step(net, mode: str, device: torch.device, amp: bool):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    memory_format = torch.channels_last if mode in ("channels_last", "compile") else torch.contiguous_format
    net.to(device=device, memory_format=memory_format).train()
    forward = torch.compile(net) if mode == "compile" else net

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            logits = forward(x.contiguous(memory_format=memory_format), y)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _images_per_second(step, x, y, iters: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * len(y) / (time.perf_counter() - start)


def run(nets, margin: int, batch_size: int, modes, device: torch.device, iters: int, repeats: int,
        amp: bool) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    rows = []
    for name in nets:
        candidates = {}
        for mode in modes:
            for head, m in (("softmax", 1), ("lsoftmax", margin)):
                net = build_model(name, m)
                net.head.beta.fill_(0.0)
                candidates[(mode, head)] = _make_step(net, mode, device, amp)
        for step in candidates.values():  # warm-up (and compilation)
            _images_per_second(step, x, y, 2, device)
        samples = {key: [] for key in candidates}
        for _ in range(repeats):
            for key, step in candidates.items():
                samples[key].append(_images_per_second(step, x, y, iters, device))
        for mode in modes:
            soft = statistics.median(samples[(mode, "softmax")])
            ls = statistics.median(samples[(mode, "lsoftmax")])
            rows.append({"net": name, "mode": mode, "softmax_ips": soft, "lsoftmax_ips": ls,
                         "time_ratio": soft / ls})
    return rows


def format_table(rows: list[dict], margin: int) -> str:
    lines = [f"| net | mode | softmax head img/s | L-Softmax m={margin} img/s | L-Softmax time / softmax time |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['mode']} | {r['softmax_ips']:.0f} | {r['lsoftmax_ips']:.0f} | "
                     f"{r['time_ratio']:.3f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nets", default="fast,vis,paper", help="comma-separated nets")
    p.add_argument("--margin", type=int, default=4, help="L-Softmax margin")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--modes", default="eager,channels_last", help="comma-separated: eager, channels_last, compile")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (as training uses on CUDA)")
    p.add_argument("--iters", type=int, default=10, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per candidate (median reported)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"eager", "channels_last", "compile"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    device = torch.device(args.device)
    rows = run(args.nets.split(","), args.margin, args.batch_size, modes, device, args.iters, args.repeats, args.amp)
    print(f"training step throughput, batch {args.batch_size}, {device}"
          f"{' bf16 autocast' if args.amp else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(rows, args.margin))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
