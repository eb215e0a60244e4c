"""The server under attack: started and stopped through ServerProcess, its processes' memory and threads, and a digest of what it logged."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.server_process import ServerProcess

# ------------------------------------------------------------------------------------------- the server


def start_server(repository: Path, opts: argparse.Namespace, log_name: str) -> tuple[ServerProcess, dict]:
    """`python -m serving` in --cwd with --server-flags, under `prlimit --nofile=N:N` (N = --nofile; 0: as is);
    waits for `ready` and returns (server, the ready record)."""
    flags = shlex.split(opts.server_flags)
    limited = {}
    if opts.nofile:
        limited = dict(python="/usr/bin/prlimit",
                       entry=(f"--nofile={opts.nofile}:{opts.nofile}", "--", sys.executable, "-m", "serving"))
    log_path = opts.log_dir / f"abuse_{opts.label}_{log_name}.log" if opts.log_dir else None
    server = ServerProcess(repository, *flags, log_path=log_path, log_level="info", cwd=opts.cwd, **limited)
    try:
        server.start(180)
        return server, server.wait_for("ready")
    except BaseException:
        server.kill()
        raise


def end_flood(result: dict, server: ServerProcess, flood, lines_before: int) -> None:
    """After a flood's window: the server's memory and what it logged meanwhile, then the attacker's own figures."""
    result["server_end"] = usage_mb(server.proc.pid) if server.proc.poll() is None else None
    result["server_log"] = log_digest(server.lines[lines_before:])
    flood.stop()
    result["attack"] = flood.stats()
    if flood.error:
        result["attack_error"] = flood.error


def stop_server(server: ServerProcess, timeout: float = 60.0) -> dict:
    """SIGTERM and the exit status; a server that died earlier or does not exit in time is reported (with its last
    log lines), never raised: the figures up to then are the result."""
    died = server.proc.poll() is not None
    started = time.monotonic()
    try:
        code: int | str = server.stop(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        code = f"killed: no exit within {timeout:g} s of SIGTERM"
    result = {"exit": code, "stop_s": round(time.monotonic() - started, 2), "died_before_stop": died}
    if died or code != 0:
        result["last_log"] = [line[:400] for line in server.lines[-12:]]
    return result


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant (a --workers server's workers), from /proc/PID/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:  # gone meanwhile
            continue
    return pids


def tree_usage(pid: int) -> tuple[int, int]:
    """(VmRSS KiB, threads) summed over the process tree."""
    rss = threads = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
        except OSError:
            continue
    return rss, threads


class Sampler(threading.Thread):
    """The server tree's RSS and threads every `every` s; `peak()` the highest since the last reset."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.stopped = threading.Event()
        self.max_rss = self.max_threads = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            rss, threads = tree_usage(self.pid)
            self.max_rss, self.max_threads = max(self.max_rss, rss), max(self.max_threads, threads)

    def reset(self) -> None:
        self.max_rss = self.max_threads = 0

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(2)


def usage_mb(pid: int) -> dict:
    rss, threads = tree_usage(pid)
    return {"rss_mb": round(rss / 1024, 1), "threads": threads}


def log_digest(lines: list[str], distinct: int = 6) -> dict:
    """What the server logged: line count, bytes, and the first `distinct` kinds of line (JSON: level + event;
    other text, e.g. gRPC core's own stderr, with numbers folded) with a count and a first example each."""
    kinds: dict[str, list] = {}
    for line in lines:
        try:
            record = json.loads(line)
            key = f"{record.get('level')} {record.get('logger')} {record.get('event')}"
        except (ValueError, AttributeError):
            key = re.sub(r"\d+", "N", line)[:120]
        if key in kinds:
            kinds[key][0] += 1
        else:
            kinds[key] = [1, line[:300]]
    return {"lines": len(lines), "bytes": sum(len(line.encode()) + 1 for line in lines), "kinds": len(kinds),
            "first": [{"count": n, "line": example} for n, example in list(kinds.values())[:distinct]]}


