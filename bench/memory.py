"""What the server holds in memory for what it is sent: idle, steady traffic, tiny files declaring huge canvases,
honest huge images, and a flood of requests it refuses. One server (subprocess), the scenarios in turn.

    python -m bench.memory --model-repository REPO [--scenarios idle,steady,webp,png,flood] [--steady-requests 20000]
        [--flood-seconds 15] [--json out.json] [--server-cwd OTHER_CHECKOUT] [-- extra server flags]

Per scenario: the server's RSS before, its peak while the scenario runs (VmHWM, reset through
/proc/PID/clear_refs before each one, and VmRSS sampled every 5 ms where that reset is not allowed), the RSS a few
seconds after, and the latency of small 28x28 requests sent meanwhile (p50/p99/max). Scenarios:
- steady: N batch-1 raw-pixel Classify calls from 8 threads;
- webp: 8 concurrent requests of four lossless WebPs of ~700 bytes declaring 4000x4000 each;
- png: 8 concurrent requests of four RGBA 4096x4096 PNGs (~75 KB each);
- flood: 4 clients sending 16 PNGs of 4096x4096 per request (over the request pixel budget: refused) with a 1 s
  deadline for --flood-seconds.
Prints a markdown table; every figure is this machine's, measured in this run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.server_process import ServerProcess
from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

SCENARIOS = ("idle", "steady", "webp", "png", "flood")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def webp_declaring(side: int = 4000) -> bytes:
    """A lossless WebP of a blank side x side canvas: a few hundred bytes that decode to side² pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), "white").save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def rgba_png(side: int = 4096) -> bytes:
    """side x side RGBA with a dark bar on a light gradient: small compressed, the full size to decode."""
    gray = np.broadcast_to(np.linspace(180, 250, side, dtype=np.float32), (side, side)).astype(np.uint8).copy()
    gray[side // 4:3 * side // 4, side // 2 - side // 40:side // 2 + side // 40] = 20
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)])).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def small_png() -> bytes:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, "PNG")
    return buffer.getvalue()


class Memory:
    """The server's resident set: now, and its peak since reset()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def rss_mib(self) -> float:
        return self._status("VmRSS") / 1024

    def reset(self) -> None:
        """Peak from now on: VmHWM reset (clear_refs 5) and a 5 ms VmRSS sampler as a fallback."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._status("VmRSS"))
            time.sleep(0.005)

    def peak_mib(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max([self._status("VmHWM"), *self._samples]) / 1024


class SmallProbe:
    """28x28 PNG Classify calls one after another on their own channel while a scenario runs; their latencies."""

    def __init__(self, address: str) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True)

    def _run(self, address: str) -> None:
        request = pb.ClassifyRequest(images=[pb.Image(encoded=small_png())])
        with grpc.insecure_channel(address) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            classify(request, timeout=30)  # connected before timing starts
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    classify(request, timeout=10)
                    self.latencies.append(time.perf_counter() - start)
                except grpc.RpcError as err:
                    self.errors.append(err.code().name)
                time.sleep(0.02)

    def __enter__(self) -> "SmallProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def summary(self) -> dict:
        if not self.latencies:
            return {"small_requests": 0, "small_errors": len(self.errors)}
        ms = np.array(self.latencies) * 1e3
        return {"small_requests": len(ms), "small_p50_ms": round(float(np.median(ms)), 1),
                "small_p99_ms": round(float(np.percentile(ms, 99)), 1), "small_max_ms": round(float(ms.max()), 1),
                "small_errors": len(self.errors)}


def _outcomes(calls: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in calls:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _call(classify, request, timeout: float) -> str:
    try:
        classify(request, timeout=timeout)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def concurrent_requests(address: str, request: pb.ClassifyRequest, clients: int = 8) -> dict:
    """`clients` requests at once, each on its own channel; their outcomes."""
    def one(_):
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            return _call(pb_grpc.DigitServiceStub(channel).Classify, request, 60)

    with ThreadPoolExecutor(clients) as pool:
        return _outcomes(list(pool.map(one, range(clients))))


def steady(address: str, requests: int, threads: int = 8) -> dict:
    request = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))])
    with grpc.insecure_channel(address) as channel:
        classify = pb_grpc.DigitServiceStub(channel).Classify

        def run(count: int) -> list[str]:
            return [_call(classify, request, 30) for _ in range(count)]

        with ThreadPoolExecutor(threads) as pool:
            results = [o for chunk in pool.map(run, [requests // threads] * threads) for o in chunk]
    return _outcomes(results)


def flood(address: str, seconds: float, clients: int = 4, images: int = 16) -> dict:
    request = pb.ClassifyRequest(images=[pb.Image(encoded=rgba_png())] * images)
    stop = time.monotonic() + seconds
    results: list[str] = []

    def client(_):
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            classify = pb_grpc.DigitServiceStub(channel).Classify
            while time.monotonic() < stop:
                results.append(_call(classify, request, 1.0))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return _outcomes(results)


def run_scenario(name: str, server: ServerProcess, memory: Memory, args: argparse.Namespace) -> dict:
    before = memory.rss_mib()
    memory.reset()
    row: dict = {"scenario": name, "rss_before_mib": round(before, 1)}
    with SmallProbe(server.address) as probe:
        start = time.perf_counter()
        if name == "idle":
            time.sleep(2)
            outcomes: dict = {}
        elif name == "steady":
            outcomes = steady(server.address, args.steady_requests)
        elif name == "webp":
            outcomes = concurrent_requests(server.address, pb.ClassifyRequest(
                images=[pb.Image(encoded=webp_declaring())] * 4))
        elif name == "png":
            outcomes = concurrent_requests(server.address, pb.ClassifyRequest(
                images=[pb.Image(encoded=rgba_png())] * 4))
        else:
            outcomes = flood(server.address, args.flood_seconds)
        row["seconds"] = round(time.perf_counter() - start, 2)
    row["peak_mib"] = round(memory.peak_mib(), 1)
    time.sleep(args.settle_seconds)
    row["rss_after_mib"] = round(memory.rss_mib(), 1)
    row["outcomes"] = outcomes
    row.update(probe.summary())
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| scenario | RSS before | peak | RSS after | small p50 / p99 / max (ms) | outcomes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        small = (f"{r['small_p50_ms']} / {r['small_p99_ms']} / {r['small_max_ms']}" if r.get("small_requests")
                 else "–")
        lines.append(f"| {r['scenario']} | {r['rss_before_mib']} MiB | {r['peak_mib']} MiB | {r['rss_after_mib']} MiB "
                     f"| {small} | {r['outcomes'] or '–'} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", required=True)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   type=lambda text: [s for s in text.split(",") if s],
                   help=f"comma-separated, from {', '.join(SCENARIOS)}")
    p.add_argument("--steady-requests", type=int, default=20_000)
    p.add_argument("--flood-seconds", type=float, default=15.0)
    p.add_argument("--settle-seconds", type=float, default=3.0, help="wait before reading the RSS after a scenario")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--server-cwd", default=None,
                   help="run the server from another checkout (e.g. a git worktree of an older commit: before/after)")
    p.add_argument("server_flags", nargs=argparse.REMAINDER, help="after --: extra flags for python -m serving")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        get_args_parser().error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    flags = [f for f in args.server_flags if f != "--"] or ["--backend", "onnx"]
    rows = []
    where = {"cwd": args.server_cwd} if args.server_cwd else {}
    with ServerProcess(Path(args.model_repository).resolve(), *flags, log_level="info", **where).start() as server:
        memory = Memory(server.proc.pid)
        time.sleep(1)
        for name in args.scenarios:
            rows.append(run_scenario(name, server, memory, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"server: python -m serving --model-repository {args.model_repository} {' '.join(flags)}")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
