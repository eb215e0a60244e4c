"""Serving throughput and latency, perf_analyzer style, beside the in-process backend as the limit.

    python -m bench.serve --model-repository model_repository [--backends onnx,torchscript]
        [--apis kserve,typed] [--batching on,off] [--concurrency 1,4,16,64] [--window-seconds 5]
        [--device cpu] [--output bench_serve.csv]

For each backend × batching setting a server is started in a subprocess; for each API and concurrency
N, N closed-loop clients (bench/loadgen.py, spread over client processes) each keep one batch-1
request in flight. Measurement windows of --window-seconds count requests by completion; a point is
stable when the last 3 windows agree within 10% on throughput and p50 latency (at most
--max-windows), and the last 3 windows are reported. The server's Prometheus counters give the queue
and compute time per request. Beside each row stands the in-process backend (the same graph, no
server) at the batch size the server could at best form (batch N with batching, batch 1 without).
Prints a markdown table and writes a CSV in perf_analyzer's column layout (times in µs) plus our columns.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.server_process import ServerProcess

from serving.repository.format import BY_KIND, IMAGE_DIMS, INPUT, MANIFEST_FILE, OUTPUTS

LOADGEN = Path(__file__).with_name("loadgen.py")
ROOT = Path(__file__).resolve().parents[1]
BACKEND_MODELS = {kind: fmt.directory for kind, fmt in BY_KIND.items()}  # --backends name → model name
PERF_ANALYZER_COLUMNS = ["Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv",
                         "Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output",
                         "Client Recv", "p50 latency", "p90 latency", "p95 latency", "p99 latency", "Avg latency"]
EXTRA_COLUMNS = ["api", "backend", "batching", "device", "windows", "stable", "errors", "in-process limit/s",
                 "ratio to limit", "in-process p50 batch-1 us"]


# ------------------------------------------------------------------------------------ in-process limit


class InProcess:
    """The repository's graph called directly: what a server could do at best on this machine."""

    def __init__(self, repo: Path, backend: str, device: str) -> None:
        path = repo / BY_KIND[backend].file()
        if backend == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda x: session.run(list(OUTPUTS), {INPUT: x})
        else:
            import torch

            module = torch.jit.load(str(path), map_location=device).eval()
            dev = torch.device(device)

            def run(x):
                with torch.inference_mode():  # every output the graph has (known_score too), as the server runs it
                    return tuple(o.cpu().numpy() for o in module(torch.from_numpy(x).to(dev)))

            self.run = run

    def measure(self, batch: int, seconds: float = 1.5) -> tuple[float, float]:
        """(images/s, median latency µs) at a fixed batch size."""
        x = np.random.default_rng(0).integers(0, 256, (batch, *IMAGE_DIMS), dtype=np.uint8)
        for _ in range(5):
            self.run(x)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t0 = time.perf_counter()
            self.run(x)
            times.append(time.perf_counter() - t0)
        return batch * len(times) / sum(times), statistics.median(times) * 1e6


# ----------------------------------------------------------------------------------------------- server


class Server:
    def __init__(self, repo: Path, backend: str, batching: bool, device: str, extra: list[str]) -> None:
        self.process = ServerProcess(repo, "--backend", backend, "--device", device, "--log-level", "info",
                                     "--dynamic-batching" if batching else "--no-dynamic-batching", *extra)
        try:
            self.process.start(timeout=120)
        except AssertionError as exc:
            self.process.kill()
            raise RuntimeError(f"server did not start: {str(exc)[-2000:]}") from None
        self.address, self.metrics_port = self.process.address, self.process.metrics_port

    def counters(self) -> dict[str, float]:
        """Sums of the Triton-named counters we read (over all label sets)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        wanted = {"nv_inference_request_success", "nv_inference_queue_duration_us",
                  "nv_inference_compute_infer_duration_us", "nv_inference_exec_count", "nv_inference_count"}
        totals = dict.fromkeys(wanted, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removesuffix("_total")
                if name in wanted:
                    totals[name] += sample.value
        return totals

    def stop(self) -> None:
        try:
            self.process.stop(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ------------------------------------------------------------------------------------------- one point


def _window(server: Server, api: str, model: str, concurrency: int, seconds: float, processes: int,
            client: str) -> dict:
    before = server.counters()
    cmd = [sys.executable, str(LOADGEN), "run", "--address", server.address, "--api", api, "--model", model,
           "--concurrency", str(concurrency), "--processes", str(min(processes, concurrency)),
           "--duration", str(seconds), "--warmup", "0.5", "--batch", "1", "--client", client]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {shlex.join(cmd)}\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = server.counters()
    served = max(1.0, after["nv_inference_request_success"] - before["nv_inference_request_success"])
    result["queue_us"] = (after["nv_inference_queue_duration_us"] - before["nv_inference_queue_duration_us"]) / served
    result["compute_us"] = (after["nv_inference_compute_infer_duration_us"]
                            - before["nv_inference_compute_infer_duration_us"]) / served
    execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    result["mean_batch"] = (after["nv_inference_count"] - before["nv_inference_count"]) / execs if execs else 0.0
    return result


def _stable(windows: list[dict]) -> bool:
    if len(windows) < 3:
        return False
    last = windows[-3:]
    for key in ("images_per_s", "p50_ms"):
        values = [w[key] for w in last]
        if min(values) <= 0 or max(values) / min(values) > 1.10:
            return False
    return True


def measure_point(server: Server, api: str, model: str, concurrency: int, seconds: float, max_windows: int,
                  processes: int, client: str = "aio") -> dict:
    windows = []
    while len(windows) < max_windows:
        windows.append(_window(server, api, model, concurrency, seconds, processes, client))
        if _stable(windows):
            break
    last = windows[-3:]
    mean = lambda key: statistics.fmean(w[key] for w in last)  # noqa: E731
    errors: dict[str, int] = {}
    for w in windows:
        for code, n in w["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {"images_per_s": mean("images_per_s"), "p50_ms": mean("p50_ms"), "p90_ms": mean("p90_ms"),
            "p95_ms": mean("p95_ms"), "p99_ms": mean("p99_ms"), "queue_us": mean("queue_us"),
            "compute_us": mean("compute_us"), "mean_batch": mean("mean_batch"), "windows": len(windows),
            "stable": _stable(windows), "errors": errors}


# ----------------------------------------------------------------------------------------------- sweep


def sweep(args) -> list[dict]:
    repo = Path(args.model_repository)
    rows = []
    for backend in args.backends:
        limit = InProcess(repo, backend, args.device)
        limits = {b: limit.measure(b) for b in sorted(set(args.concurrency) | {1})}
        for batching in args.batching:
            server = Server(repo, backend, batching, args.device, shlex.split(args.server_args))
            try:
                for api in args.apis:
                    for c in args.concurrency:
                        point = measure_point(server, api, BACKEND_MODELS[backend], c, args.window_seconds,
                                              args.max_windows, args.client_processes, args.client)
                        limit_ips = limits[c if batching else 1][0]
                        row = {"api": api, "backend": backend, "batching": batching, "device": args.device,
                               "concurrency": c, **point, "limit_ips": limit_ips,
                               "ratio": point["images_per_s"] / limit_ips, "limit_p50_us_b1": limits[1][1]}
                        rows.append(row)
                        print(f"{backend:>11} batching={'on ' if batching else 'off'} {api:>6} c={c:<3} "
                              f"{row['images_per_s']:8.0f} img/s p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms"
                              f" mean batch {row['mean_batch']:.1f} | limit {limit_ips:8.0f} img/s "
                              f"({row['ratio']:.2f}x) errors {row['errors'] or 0}", flush=True)
            finally:
                server.stop()
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PERF_ANALYZER_COLUMNS + EXTRA_COLUMNS)
        for r in rows:
            us = lambda ms: round(ms * 1000)  # noqa: E731
            writer.writerow([r["concurrency"], round(r["images_per_s"], 1), "", "", round(r["queue_us"]), "",
                             round(r["compute_us"]), "", "", us(r["p50_ms"]), us(r["p90_ms"]), us(r["p95_ms"]),
                             us(r["p99_ms"]), "", r["api"], r["backend"], "on" if r["batching"] else "off",
                             r["device"], r["windows"], r["stable"], json.dumps(r["errors"]),
                             round(r["limit_ips"], 1), round(r["ratio"], 3), round(r["limit_p50_us_b1"])])


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | batching | API | concurrency | images/s | p50 ms | p90 ms | p95 ms | p99 ms | mean batch | "
             "in-process limit images/s | ratio | stable |", "|---" * 13 + "|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {'on' if r['batching'] else 'off'} | {r['api']} | {r['concurrency']} | "
                     f"{r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['mean_batch']:.1f} | {r['limit_ips']:.0f} | {r['ratio']:.2f}× | "
                     f"{'yes' if r['stable'] else 'no'} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's two CPU goals, evaluated on the rows measured."""
    out = []
    for r in rows:
        if r["batching"] and r["concurrency"] == 64:
            out.append(f"{r['backend']}/{r['api']} c=64 with batching: {r['ratio']:.2f}× the in-process limit "
                       f"(goal ≥ 0.85×): {'met' if r['ratio'] >= 0.85 else 'not met'}")
        if r["concurrency"] == 1:
            gap = r["p50_ms"] * 1000 - r["limit_p50_us_b1"]
            out.append(f"{r['backend']}/{r['api']} batching {'on' if r['batching'] else 'off'} c=1: p50 "
                       f"{r['p50_ms']:.3f} ms vs in-process batch-1 {r['limit_p50_us_b1'] / 1000:.3f} ms, gap "
                       f"{gap / 1000:.3f} ms (goal ≤ 0.5 ms): {'met' if gap <= 500 else 'not met'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="written by python -m export")
    p.add_argument("--backends", default="onnx,torchscript", help="comma-separated: onnx, torchscript")
    p.add_argument("--apis", default="kserve,typed", help="comma-separated: kserve (ModelInfer), typed (Classify)")
    p.add_argument("--batching", default="on,off", help="comma-separated: on, off (dynamic batching)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--window-seconds", type=float, default=5.0, help="measurement window")
    p.add_argument("--max-windows", type=int, default=5, help="windows per point before giving up on stability")
    p.add_argument("--client-processes", type=int, default=2, help="load-generator processes")
    p.add_argument("--client", default="aio", choices=["aio", "tritonclient"],
                   help="load generator: pre-serialised grpc.aio calls, or tritonclient as users call it (KServe)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="server and in-process device")
    p.add_argument("--server-args", default="", help="extra flags for python -m serving")
    p.add_argument("--output", default="bench_serve.csv", help="CSV path (perf_analyzer layout + our columns)")
    args = p.parse_args(argv)
    args.backends = args.backends.split(",")
    args.apis = args.apis.split(",")
    args.batching = [b == "on" for b in args.batching.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    unknown = set(args.backends) - set(BACKEND_MODELS)
    if unknown or not set(args.apis) <= {"kserve", "typed"}:
        p.error(f"unknown backend or API: {sorted(unknown | (set(args.apis) - {'kserve', 'typed'}))}")
    if not (Path(args.model_repository) / MANIFEST_FILE).is_file():
        p.error(f"{args.model_repository} is not a model repository (run python -m export first)")
    rows = sweep(args)
    write_csv(rows, Path(args.output))
    print(format_table(rows))
    print("\n".join(goals(rows)))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
