"""Side-by-side A/B of server variants: throughput, p50 latency and the server's CPU time per request.

    python -m bench.serve_ab --model-repository REPO \\
        --variant "before=/tmp/before|" --variant "after=.|--intra-op-threads 2" \\
        [--concurrency 1,16,64] [--rounds 3] [--window-seconds 2] [--api kserve|typed] [--batch 1] \\
        [--client aio|tritonclient] [--client-processes 1] [--json OUT]

A variant is `LABEL=CWD|[ENV=VALUE ...] [server flags]`: `python -m serving --model-repository REPO [server flags]`
run in CWD with ENV=VALUE added to its environment. CWD is a directory holding a serving/ package: `.` for the
working tree, or e.g. `git archive a329c63 serving | tar -x -C /tmp/before` for an older commit, so two versions
of the code are compared in one run. The server's argparse takes the last --model-repository, so a variant's own
`--model-repository OTHER` among its flags compares two repositories with the same code.

Every variant's server is up at once (an idle one costs next to nothing); per round, per concurrency level, each
variant gets one window of bench/loadgen.py's closed-loop load in turn, the order alternating between levels and
rounds, so slow drift of a shared machine (other jobs, thermals) falls on all variants alike instead of on
whichever ran last. Per run it records loadgen's images/s and p50, and the server's CPU time per request: the
server process's utime+stime over the run divided by the requests its `nv_inference_request_success` counter
went up by (the client's own CPU time never enters it), and from it the images per server CPU-second (--batch
images per request: with more, the model's share of the server's work grows), and the requests per backend call
(its nv_inference_exec_count: how well the batcher gathered). Prints one JSON line per run as it
goes, then per level and variant the medians over rounds with ratios to the first variant; --json writes the runs
and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.server_process import PROJECT_ROOT, ServerProcess
from serving.repository.format import BY_KIND, MANIFEST_FILE

LOADGEN = Path(__file__).with_name("loadgen.py")
ENV_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SAFE_NAME = re.compile(r"[^\w.-]")  # a label as a file name
# flags the harness owns: ServerProcess reads the ports back from JSON logs and scrapes the metrics port
RESERVED_FLAGS = ("--log-format", "--metrics-port")
SUMMARY_KEYS = ("images_per_s", "p50_us", "server_cpu_us_per_request", "images_per_server_cpu_s")


# ------------------------------------------------------------------------------------------------ variants


@dataclass
class Variant:
    """One server configuration under test: its label in the table, where it runs, and how."""

    label: str
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """`LABEL=CWD|[ENV=VALUE ...] [flags]` → Variant; ValueError saying what is wrong (main turns it into exit 2).

    Leading ENV=VALUE tokens are environment, everything from the first other token on is server flags (so a flag's
    value may contain `=`); tokens are split like a shell would (quotes allowed)."""
    label, eq, rest = text.partition("=")
    cwd, bar, flags_text = rest.partition("|")
    if not eq or not bar:
        raise ValueError(f"--variant {text!r}: expected LABEL=CWD|[ENV=VALUE ...] [server flags]")
    label, cwd = label.strip(), cwd.strip()
    if not label or not cwd:
        raise ValueError(f"--variant {text!r}: empty label or CWD")
    env, tokens = split_env(flags_text, f"--variant {text!r}")
    for token in tokens:
        if any(token == flag or token.startswith(flag + "=") for flag in RESERVED_FLAGS):
            raise ValueError(f"--variant {text!r}: {token.split('=')[0]} is set by the harness")
    return Variant(label, Path(cwd), env, tokens)


def split_env(text: str, where: str) -> tuple[dict[str, str], list[str]]:
    """`[ENV=VALUE ...] rest` split like a shell would (quotes allowed) → (environment, the other tokens); leading
    NAME=VALUE tokens are environment, everything from the first other token on is kept as it is (so a flag's value
    may contain `=`). ValueError naming `where` when the quoting is broken."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    env = {}
    while tokens and ENV_TOKEN.match(tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    return env, tokens


def check_variants(variants: list[Variant]) -> None:
    """Refuse, before starting anything, what would only fail later: duplicate labels, a CWD without serving/
    (`python -m serving` would silently import some other copy, or none)."""
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate variant labels: {labels}")
    for v in variants:
        if not (v.cwd / "serving" / "__main__.py").is_file():
            raise ValueError(f"variant {v.label}: {v.cwd} has no serving/ package (serving/__main__.py)")


# --------------------------------------------------------------------------------------------- servers


def start_servers(variants: list[Variant], repository: Path, log_dir: Path | None,
                  timeout: float = 180.0) -> list[ServerProcess]:
    """Start every variant's server, then wait until each is ready: they load their models in parallel. On a
    failure the ones already started are stopped before the error propagates."""
    servers: list[ServerProcess] = []
    try:
        for v in variants:
            log_path = log_dir / f"serve_ab_{SAFE_NAME.sub('_', v.label)}.log" if log_dir else None
            servers.append(ServerProcess(repository, *v.flags, log_path=log_path, log_level="info",
                                         cwd=v.cwd.resolve(), env=v.env))
        for v, server in zip(variants, servers):
            try:
                server.start(timeout)
            except AssertionError as exc:
                raise RuntimeError(f"variant {v.label}: server did not start: {str(exc)[-3000:]}") from None
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: list[ServerProcess]) -> None:
    """SIGTERM every server and wait; each is stopped even when another fails, and a bad exit is reported on
    stderr rather than raised, so it never hides the error that ended the run."""
    for server in servers:
        try:
            code = server.stop(timeout=30)
            if code != 0:
                print(f"server {server.command} exited with {code}; last log lines:\n"
                      + "\n".join(server.lines[-20:]), file=sys.stderr)
        except subprocess.TimeoutExpired:
            server.kill()
            print(f"server {server.command} did not stop in 30 s: killed", file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001 - e.g. a second Ctrl-C: still kill, then go on to the next
            server.kill()
            print(f"stopping server {server.command}: {exc!r}", file=sys.stderr)


# ------------------------------------------------------------------------------------------- measuring


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, is [0])."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # after the command name, which may contain spaces


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads) and of every live process under it (a --workers server's
    workers), from /proc/PID/stat: the server's own work, whatever the client costs."""
    fields = proc_stat(pid)
    ticks = int(fields[11]) + int(fields[12])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                child = proc_stat(int(entry))
            except OSError:  # gone meanwhile
                continue
            if int(child[1]) == pid:  # field 4, ppid
                ticks += round(process_cpu_seconds(int(entry)) * os.sysconf("SC_CLK_TCK"))
    return ticks / os.sysconf("SC_CLK_TCK")


def requests_served(metrics_port: int) -> float:
    """The server's nv_inference_request_success summed over models: the requests it answered, so CPU per request
    divides by what the server did rather than by what the client counted in its window."""
    return served_counts(metrics_port)[0]


def served_counts(metrics_port: int) -> tuple[float, float]:
    """(nv_inference_request_success, nv_inference_exec_count), each summed over models: requests answered and the
    backend calls (batches) they took."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    totals = {"nv_inference_request_success": 0.0, "nv_inference_exec_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in totals:
                totals[name] += sample.value
    return totals["nv_inference_request_success"], totals["nv_inference_exec_count"]


def cpu_per_request_us(cpu_before: float, cpu_after: float, served_before: float, served_after: float) -> float:
    """Server CPU µs per request over one run (requests floored at 1, so an idle run reads as its CPU, not inf)."""
    return (cpu_after - cpu_before) / max(1.0, served_after - served_before) * 1e6


def run_loadgen(address: str, args: argparse.Namespace, concurrency: int) -> tuple[dict, float]:
    """One closed-loop window of bench/loadgen.py (its own processes, as it must be) → (its JSON summary, the
    client's CPU seconds: loadgen and its workers, from RUSAGE_CHILDREN)."""
    cmd = [sys.executable, str(LOADGEN), "run", "--address", address, "--api", args.api, "--client", args.client,
           "--model", args.model, "--concurrency", str(concurrency), "--batch", str(args.batch),
           "--processes", str(max(1, min(args.client_processes, concurrency))),
           "--duration", str(args.window_seconds), "--warmup", str(args.warmup_seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}): {shlex.join(cmd)}\n{out.stderr[-2000:]}")
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return json.loads(out.stdout.strip().splitlines()[-1]), client_cpu


def measure(variant: Variant, server: ServerProcess, args: argparse.Namespace, round_: int,
            concurrency: int) -> dict:
    """One variant at one level in one round: loadgen's throughput and p50, the server's CPU per request."""
    pid, metrics_port = server.proc.pid, server.metrics_port
    cpu0, (served0, batches0) = process_cpu_seconds(pid), served_counts(metrics_port)
    result, client_cpu = run_loadgen(server.address, args, concurrency)
    cpu1, (served1, batches1) = process_cpu_seconds(pid), served_counts(metrics_port)
    served = served1 - served0
    cpu_us = cpu_per_request_us(cpu0, cpu1, served0, served1)
    return {"label": variant.label, "round": round_, "concurrency": concurrency,
            "images_per_s": result["images_per_s"] or 0.0, "p50_us": (result["p50_ms"] or 0.0) * 1000,
            "p99_us": (result["p99_ms"] or 0.0) * 1000,
            "server_cpu_us_per_request": cpu_us, "images_per_server_cpu_s": args.batch * 1e6 / cpu_us,
            "client_cpu_us_per_request": client_cpu / max(1.0, served) * 1e6,
            "server_requests": served, "requests_per_batch": served / max(1.0, batches1 - batches0),
            "errors": result["errors"]}


def run_ab(variants: list[Variant], servers: list[ServerProcess], args: argparse.Namespace) -> list[dict]:
    """Every round, every level, every variant in turn; the order flips at each step, so over rounds each variant
    runs first as often as last (a window right after another variant's load starts on a busier machine)."""
    runs = []
    pairs = list(zip(variants, servers))
    step = 0
    for round_ in range(args.rounds):
        for concurrency in args.concurrency:
            for variant, server in pairs if step % 2 == 0 else pairs[::-1]:
                runs.append(measure(variant, server, args, round_, concurrency))
                print(json.dumps(runs[-1]), flush=True)
                if runs[-1]["errors"]:
                    print(f"warning: {variant.label} c={concurrency}: errors {runs[-1]['errors']}", file=sys.stderr)
            step += 1
    return runs


# --------------------------------------------------------------------------------------------- summary


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    """Per level and variant (in --variant order): medians over rounds, ratios to the first variant."""
    rows = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        base = None
        for label in labels:
            mine = [r for r in runs if r["label"] == label and r["concurrency"] == concurrency]
            if not mine:
                continue
            row = {"label": label, "concurrency": concurrency,
                   **{k: statistics.median(r[k] for r in mine) for k in SUMMARY_KEYS},
                   "rounds_images_per_s": [r["images_per_s"] for r in mine],
                   "requests_per_batch": statistics.median(r.get("requests_per_batch", 0.0) for r in mine)}
            base = base or row
            for k in SUMMARY_KEYS:
                row[f"{k}_ratio"] = row[k] / base[k] if base[k] else float("nan")
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The fixed-width table the A/B figures in BENCHMARKS.md are read from."""
    lines = [f"{'variant':<12}{'conc':>5}{'infer/s (median)':>18}{'ratio':>7}{'p50 us':>10}{'ratio':>7}"
             f"{'server CPU us/req':>19}{'ratio':>7}{'images/server CPU-s':>21}{'ratio':>7}{'req/batch':>10}  rounds infer/s"]
    for r in rows:
        lines.append(f"{r['label']:<12}{r['concurrency']:>5}{r['images_per_s']:>18,.0f}{r['images_per_s_ratio']:>7.2f}"
                     f"{r['p50_us']:>10,.0f}{r['p50_us_ratio']:>7.2f}{r['server_cpu_us_per_request']:>19,.0f}"
                     f"{r['server_cpu_us_per_request_ratio']:>7.2f}{r['images_per_server_cpu_s']:>21,.0f}"
                     f"{r['images_per_server_cpu_s_ratio']:>7.2f}{r.get('requests_per_batch', 0.0):>10.1f}  "
                     + " / ".join(format(x, ".0f") for x in r["rounds_images_per_s"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve_ab", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", required=True, type=Path,
                   help="served by every variant (a variant's own --model-repository flag overrides it)")
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=CWD|[ENV=V ...] [FLAGS]",
                   help="a server to compare (twice or more); the first is the ratios' base")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--window-seconds", type=float, default=2.0, help="measured seconds per run")
    p.add_argument("--warmup-seconds", type=float, default=0.5, help="loadgen seconds before each window")
    p.add_argument("--api", choices=("kserve", "typed"), default="kserve", help="ModelInfer or typed Classify")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--client", choices=("aio", "tritonclient"), default="aio",
                   help="pre-serialised grpc.aio calls, or tritonclient as users call it (KServe only)")
    p.add_argument("--client-processes", type=int, default=1, help="load-generator processes")
    p.add_argument("--model", default=BY_KIND["onnx"].directory, help="model the load is sent to")
    p.add_argument("--log-dir", type=Path, default=None, help="write each server's log to DIR/serve_ab_LABEL.log")
    p.add_argument("--json", type=Path, default=None, help="write the runs and the medians here")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[Variant]]:
    """Arguments and variants, every usage error (exit 2 with a message) caught before a server starts."""
    p = get_args_parser()
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        if min(args.concurrency) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--concurrency {args.concurrency!r}: expected comma-separated positive integers")
    if args.rounds < 1 or args.window_seconds <= 0 or args.client_processes < 1 or args.batch < 1:
        p.error("--rounds, --client-processes and --batch must be >= 1, --window-seconds > 0")
    if args.client == "tritonclient" and args.api != "kserve":
        p.error("--client tritonclient speaks KServe only (--api kserve)")
    if not (args.model_repository / MANIFEST_FILE).is_file():
        p.error(f"{args.model_repository} is not a model repository (no {MANIFEST_FILE}; run python -m export)")
    try:
        variants = [parse_variant(text) for text in args.variant]
        check_variants(variants)
    except ValueError as exc:
        p.error(str(exc))
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    return args, variants


def main(argv: list[str] | None = None) -> int:
    args, variants = parse_args(argv)
    started = time.time()
    servers = start_servers(variants, args.model_repository.resolve(), args.log_dir)
    try:
        runs = run_ab(variants, servers, args)
    finally:
        stop_servers(servers)
    rows = summarize(runs, [v.label for v in variants])
    print("\n" + format_table(rows))
    if args.json:
        config = {"model_repository": str(args.model_repository), "variants": args.variant,
                  "concurrency": args.concurrency, "rounds": args.rounds, "window_seconds": args.window_seconds,
                  "api": args.api, "batch": args.batch, "client": args.client,
                  "client_processes": args.client_processes,
                  "seconds": round(time.time() - started, 1)}
        args.json.write_text(json.dumps({"config": config, "runs": runs, "summary": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # servers already stopped by main's finally
        sys.exit(130)
    except RuntimeError as exc:  # a server that did not start, a load generator that failed
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
