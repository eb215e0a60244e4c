"""Server CPU per KServe call, side by side, for any gRPC servers: ours at two commits, ours beside the transport floor.

    python -m bench.cpu_ab \\
        --target "null|mnist|python ../shared/peers/null_server.py {port} --embed-dim 16" \\
        --target "ours|lsoftmax_mnist_onnx|python -m serving --model-repository /tmp/tiny --port {port} --http-port -1 \\
                  --metrics-port -1" \\
        [--concurrency 1,16,64] [--rounds 5] [--requests 5000] [--json OUT]

A target is `LABEL|MODEL|[ENV=VALUE ...] COMMAND`: COMMAND (split like a shell would; `{port}` becomes a free
loopback port) is started in the project root, in a session of its own, with ENV added to its environment; it is
ready when KServe ModelReady(MODEL) answers true. Per round and level, each target in turn (the order flipping
at each step, so drift of a shared machine falls on all alike) gets --requests batch-1 ModelInfer calls from
bench/loadgen.py at that concurrency (closed loop, pre-serialised grpc.aio calls, one client process), and its
cost is the utime+stime of every process in its session over the run (a wrapper shell, --workers' processes)
divided by the calls. Prints one JSON line per run, then per level the medians over rounds with ratios to the
first target.

bench.serve_ab compares variants of this server by its own metrics; this harness needs nothing of a target but
KServe over gRPC, so it also runs servers that are not ours (the peers' null server: what Python gRPC costs with
no work at all) and copies of ours cut short at some step (bench/overhead_ladder.patch), which is how
BENCHMARKS.md's "where the time above the floor goes" table was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.serve_ab import proc_stat, split_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOADGEN = PROJECT_ROOT / "bench" / "loadgen.py"
SAFE_NAME = re.compile(r"[^\w.-]")  # a label as a file name


@dataclass
class Target:
    label: str
    model: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    address: str = ""


def parse_target(text: str) -> Target:
    """`LABEL|MODEL|[ENV=VALUE ...] COMMAND` → Target; ValueError saying what is wrong."""
    parts = text.split("|", 2)
    if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(f"--target {text!r}: expected LABEL|MODEL|[ENV=VALUE ...] COMMAND")
    env, tokens = split_env(parts[2], f"--target {text!r}")
    if not tokens or not any("{port}" in t for t in tokens):
        raise ValueError(f"--target {text!r}: the command must take the port as {{port}}")
    return Target(parts[0].strip(), parts[1].strip(), tokens, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_cpu_seconds(sid: int) -> float:
    """utime+stime of every live process in session `sid` (the target and whatever it started)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(int(entry))
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid:  # field 6, session id
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def model_ready(address: str, model: str) -> bool:
    import grpc

    from serving._proto.inference import grpc_service_pb2 as pb
    from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            return pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name=model),
                                                                      timeout=2).ready
    except grpc.RpcError:
        return False


def start(targets: list[Target], log_dir: Path, timeout: float) -> None:
    for t in targets:
        port = free_port()
        t.address = f"127.0.0.1:{port}"
        log = open(log_dir / f"cpu_ab_{SAFE_NAME.sub('_', t.label)}.log", "w")
        t.proc = subprocess.Popen([part.replace("{port}", str(port)) for part in t.command], cwd=PROJECT_ROOT,
                                  env={**os.environ, **t.env}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + timeout
    for t in targets:
        while not model_ready(t.address, t.model):
            if t.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"target {t.label}: not ready (exit {t.proc.poll()}); log in {log_dir}")
            time.sleep(0.3)


def stop(targets: list[Target]) -> None:
    for t in targets:
        if t.proc is None or t.proc.poll() is not None:
            continue
        try:
            os.killpg(t.proc.pid, signal.SIGTERM)
            t.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(t.proc.pid, signal.SIGKILL)
            t.proc.wait(10)


def measure(t: Target, concurrency: int, requests: int) -> dict:
    before = session_cpu_seconds(t.proc.pid)
    out = subprocess.run([sys.executable, str(LOADGEN), "run", "--address", t.address, "--api", "kserve",
                          "--model", t.model, "--concurrency", str(concurrency), "--processes", "1",
                          "--requests", str(requests)], cwd=PROJECT_ROOT, capture_output=True, text=True)
    after = session_cpu_seconds(t.proc.pid)
    if out.returncode != 0:
        raise RuntimeError(f"target {t.label}: load generator failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"target {t.label}: errors {result['errors']} {result.get('error_details')}")
    return {"label": t.label, "concurrency": concurrency, "requests": result["requests"],
            "requests_per_s": result["requests_per_s"],
            "server_cpu_us_per_request": 1e6 * (after - before) / max(1, result["requests"])}


def summarize(runs: list[dict], labels: list[str]) -> list[str]:
    lines = [f"{'target':<24}{'conc':>5}{'server CPU us/request':>23}{'ratio':>7}{'req/s':>9}  rounds"]
    for concurrency in sorted({r["concurrency"] for r in runs}):
        base = None
        for label in labels:
            mine = [r for r in runs if r["label"] == label and r["concurrency"] == concurrency]
            cpu = statistics.median(r["server_cpu_us_per_request"] for r in mine)
            base = base or cpu
            lines.append(f"{label:<24}{concurrency:>5}{cpu:>23,.0f}{cpu / base:>7.2f}"
                         f"{statistics.median(r['requests_per_s'] for r in mine):>9,.0f}  "
                         + " / ".join(f"{r['server_cpu_us_per_request']:.0f}" for r in mine))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_ab", description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", required=True, metavar="LABEL|MODEL|[ENV=V ...] COMMAND",
                   help="a server (twice or more); the first is the ratios' base")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=5000, help="calls per target, level and round")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args(argv)
    try:
        targets = [parse_target(text) for text in args.target]
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    labels = [t.label for t in targets]
    if len(targets) < 2 or len(set(labels)) != len(labels) or args.rounds < 1 or args.requests < 1 \
            or any(c < 1 for c in levels):
        p.error("two or more targets with distinct labels; --rounds, --requests and each concurrency >= 1")
    runs = []
    try:
        start(targets, args.log_dir, args.ready_timeout)
        step = 0
        for _ in range(args.rounds):
            for concurrency in levels:
                for t in targets if step % 2 == 0 else targets[::-1]:
                    runs.append(measure(t, concurrency, args.requests))
                    print(json.dumps(runs[-1]), flush=True)
                step += 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(targets)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print("\n".join(summarize(runs, labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
