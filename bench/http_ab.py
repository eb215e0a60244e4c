"""Side-by-side A/B of server variants over HTTP/REST: KServe JSON infer of one image, driven by wrk.

    python -m bench.http_ab --model-repository REPO --variant before=/tmp/before --variant after=. \\
        [--concurrency 16,64] [--rounds 3] [--seconds 3]

bench.serve_ab measures the gRPC path with the project's own load generator; a Python HTTP client would measure
itself, so this drives the same comparison with wrk (Debian's `wrk`, C, two threads). A variant is LABEL=CWD: a
directory holding a serving/ package (`git archive COMMIT serving | tar -x -C DIR` for an older commit). Every
variant's server is up at once; per round and concurrency each gets one wrk window in turn, the order alternating
by round. Reported per variant and concurrency: the median requests/s over rounds, every round's, the server's CPU
time per request (utime+stime of its process over the window / requests) and any non-2xx answers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.serve_ab import process_cpu_seconds
from bench.server_process import ServerProcess

MODEL = "lsoftmax_mnist_onnx"


def _script(folder: Path) -> Path:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                   "data": [0] * 784}]}, separators=(",", ":"))
    path = folder / "infer.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\nwrk.headers["Content-Type"] = "application/json"\n')
    return path


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", required=True)
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=CWD")
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        p.error("needs wrk: apt-get install -y wrk")
    variants = dict(v.split("=", 1) for v in args.variant)
    servers = {label: ServerProcess(args.model_repository, log_level="info", cwd=cwd).start()
               for label, cwd in variants.items()}
    runs: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            script = _script(Path(folder))
            for round_ in range(args.rounds):
                for concurrency in map(int, args.concurrency.split(",")):
                    order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                    for label in order:
                        server = servers[label]
                        url = f"http://127.0.0.1:{server.wait_for('listening')['http_port']}/v2/models/{MODEL}/infer"
                        before = process_cpu_seconds(server.proc.pid)
                        out = subprocess.run(["wrk", "-t2", f"-c{concurrency}", f"-d{args.seconds}s", "-s",
                                              str(script), url], capture_output=True, text=True, check=True).stdout
                        cpu = process_cpu_seconds(server.proc.pid) - before
                        requests = int(re.search(r"(\d+) requests in", out).group(1))
                        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                        failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                        runs.setdefault((label, concurrency), []).append(
                            (rate, cpu / max(requests, 1) * 1e6, int(failed.group(1)) if failed else 0))
    finally:
        for server in servers.values():
            server.stop()
    print(f"{'variant':12s} {'conc':>5s} {'req/s (median)':>15s} {'CPU us/req':>11s} {'non-2xx':>8s}  rounds req/s")
    for (label, concurrency), values in sorted(runs.items(), key=lambda item: (item[0][1], list(variants).index(item[0][0]))):
        print(f"{label:12s} {concurrency:5d} {statistics.median(v[0] for v in values):15,.0f} "
              f"{statistics.median(v[1] for v in values):11.0f} {sum(v[2] for v in values):8d}  "
              + " / ".join(f"{v[0]:.0f}" for v in values))


if __name__ == "__main__":
    main()
