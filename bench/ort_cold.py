"""What one ONNX Runtime call costs when other work ran in between, as it does in a server.

    python -m bench.ort_cold MODEL.onnx [--batch 1] [--calls 2000] [--between-mb 0,2,8] [--sleep-us 300]

The backend call is timed in the calling thread's CPU time (time.thread_time_ns), back to back ("warm") and after
the thread touched --between-mb MiB of other memory between calls, or slept --sleep-us, the way a server's event
loop runs gRPC, asyncio and the client's traffic between two requests. Loaded like the server loads it
(serving.backends.load_backend, one intra-op thread). Why: a call that costs 8 µs in a loop of its own costs many
times that in the server (BENCHMARKS.md, "Where the time above the floor goes"), because the caches no longer hold
ONNX Runtime's code and the model's weights when the next request comes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from serving.backends import load_backend
from serving.repository.format import IMAGE_DIMS


def cost_us(infer, images: np.ndarray, calls: int, between_bytes: int = 0, sleep_s: float = 0.0) -> float:
    """Mean thread CPU µs of infer(images) over `calls`, with `between_bytes` of memory rewritten (or a sleep)
    before each."""
    other = np.ones(max(1, between_bytes // 8))
    for _ in range(min(200, calls)):
        infer(images)
    total = 0
    for _ in range(calls):
        if between_bytes:
            other += 1.0
        if sleep_s:
            time.sleep(sleep_s)
        start = time.thread_time_ns()
        infer(images)
        total += time.thread_time_ns() - start
    return total / calls / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ort_cold", description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ONNX graph with the exported interface (uint8 input `image`)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--between-mb", default="0,2,8", help="MiB of other memory rewritten between calls (0: none)")
    p.add_argument("--sleep-us", type=int, default=300, help="also measure after a sleep this long (0: skip)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.calls < 1:
        p.error("--batch and --calls must be >= 1")
    backend = load_backend("onnx", args.model, "cpu", input_name="image", intra_op_threads=1)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *IMAGE_DIMS), dtype=np.uint8)
    rows = [{"between": f"{mb} MiB", "us_per_call": round(cost_us(backend.infer, images, args.calls,
                                                                  int(float(mb) * (1 << 20))), 1)}
            for mb in args.between_mb.split(",")]
    if args.sleep_us:
        rows.append({"between": f"sleep {args.sleep_us} us",
                     "us_per_call": round(cost_us(backend.infer, images, args.calls, sleep_s=args.sleep_us / 1e6), 1)})
    for row in rows:
        print(json.dumps({"model": args.model, "batch": args.batch, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
