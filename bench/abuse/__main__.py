"""`python -m bench.abuse`: the command line (see bench/abuse/__init__.py)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.server_process import PROJECT_ROOT
from bench.abuse.bodies import BODY_FORMATS
from bench.abuse.report import emit, format_table
from bench.abuse.scenarios import SCENARIOS, scenario_bodies, scenario_connections, scenario_drain, scenario_trickle

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default: all")
    p.add_argument("--cwd", type=Path, default=PROJECT_ROOT, help="directory whose serving/ runs")
    p.add_argument("--label", default=None, help="tags the results (default: the --cwd's name)")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="default: bench.tiny_repo's one-matmul repository in a temporary directory")
    p.add_argument("--server-flags", default="", help='more server flags, e.g. "--workers 2" (shell-split)')
    p.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit, soft and hard (0: as is)")
    p.add_argument("--victim-rate", type=float, default=20.0, help="calls/s per victim kind")
    p.add_argument("--window-seconds", type=float, default=60.0, help="victims' window (connections, trickle)")
    p.add_argument("--observe-seconds", type=float, default=150.0,
                   help="how long after the window the attacker's connections are watched for the server to close")
    p.add_argument("--attack-connections", type=int, default=1100)
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="an attacker connect still pending after this counts as failed to open")
    p.add_argument("--body-format", action="append", choices=BODY_FORMATS, help="repeatable; default: all")
    p.add_argument("--body-window-seconds", type=float, default=20.0)
    p.add_argument("--body-threads", type=int, default=8)
    p.add_argument("--body-timeout", type=float, default=60.0, help="an attacker's wait for one answer")
    p.add_argument("--body-grace-seconds", type=float, default=30.0,
                   help="after the window, how long unanswered attacker requests are waited for")
    p.add_argument("--deep-depth", type=int, default=28, help="kserve-json-deep's spine depth")
    p.add_argument("--gzip-inflated-bytes", type=int, default=1 << 30)
    p.add_argument("--trickle-connections", type=int, default=512)
    p.add_argument("--drain-clients", type=int, default=16)
    p.add_argument("--drain-after-seconds", type=float, default=3.0)
    p.add_argument("--json", type=Path, default=None, help="write the configuration and every result here")
    p.add_argument("--log-dir", type=Path, default=None, help="write each server's log here")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = get_args_parser().parse_args(argv)
    opts.cwd = opts.cwd.resolve()
    opts.label = opts.label or opts.cwd.name
    if not (opts.cwd / "serving" / "__main__.py").is_file():
        print(f"error: {opts.cwd} has no serving/ package", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker's sockets: as many as allowed
    if opts.log_dir:
        opts.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="abuse_repo_") as tmp:
        repository = opts.model_repository
        if repository is None:
            from bench.tiny_repo import tiny_repo

            repository = tiny_repo(Path(tmp) / "repo")
        for scenario in opts.scenario or SCENARIOS:
            try:
                if scenario in ("connections", "grpc-connections"):
                    results.append(scenario_connections(repository, opts, scenario == "grpc-connections"))
                elif scenario == "bodies":
                    results.extend(scenario_bodies(repository, opts))
                    continue  # printed per format
                elif scenario == "trickle":
                    results.append(scenario_trickle(repository, opts))
                else:
                    results.append(scenario_drain(repository, opts))
            except AssertionError as exc:  # the server did not start
                results.append({"scenario": scenario, "error": str(exc)[-2000:], "stop": {}, "seconds": None})
            emit(results[-1])
    for r in results:
        r["label"] = opts.label
    print("\n" + format_table(results, opts.label))
    if opts.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
        config["seconds"] = round(time.time() - started, 1)
        opts.json.write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
