"""The scenarios: each starts a fresh server, attacks it, measures the victims, and stops it."""

from __future__ import annotations

import argparse
import http.client
import re
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from bench.server_process import ServerProcess
from bench.abuse.bodies import BODY_FORMATS, Sender, body_limit, build_body
from bench.abuse.flood import Flood, split_kinds
from bench.abuse.report import emit
from bench.abuse.server import Sampler, end_flood, log_digest, start_server, stop_server, usage_mb
from bench.abuse.victims import run_victims, victims_for
from bench.abuse.wire import HOST, kserve_image_json

SCENARIOS = ("connections", "grpc-connections", "bodies", "trickle", "drain")


# ------------------------------------------------------------------------------------------- the scenarios


def ports(server: ServerProcess) -> tuple[int, int]:
    listening = server.wait_for("listening")
    return int(listening["http_port"]), int(listening["port"])


def scenario_connections(repository: Path, opts: argparse.Namespace, grpc_port_target: bool) -> dict:
    name = "grpc-connections" if grpc_port_target else "connections"
    began = time.monotonic()
    server, ready = start_server(repository, opts, name)
    result: dict = {"scenario": name}
    try:
        http_port, grpc_port = ports(server)
        time.sleep(1)
        result["server_before"] = usage_mb(server.proc.pid)
        lines_before = len(server.lines)
        kinds = ("silent", "h2") if grpc_port_target else ("silent", "slowloris", "keepalive")
        flood = Flood(grpc_port if grpc_port_target else http_port, split_kinds(opts.attack_connections, kinds),
                      connect_timeout=opts.connect_timeout, h2=grpc_port_target)
        flood.start()
        flood.ready.wait(opts.connect_timeout + 60)
        result["attack_open_s"] = flood.open_seconds
        result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate),
                                        opts.window_seconds)
        watched = time.monotonic()
        while flood.open_count > 0 and time.monotonic() - watched < opts.observe_seconds \
                and server.proc.poll() is None:
            time.sleep(0.5)
        result["observed_after_window_s"] = round(time.monotonic() - watched, 1)
        end_flood(result, server, flood, lines_before)
    finally:
        result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def scenario_bodies(repository: Path, opts: argparse.Namespace) -> list[dict]:
    results = []
    for fmt in opts.body_format or BODY_FORMATS:
        began = time.monotonic()
        server, ready = start_server(repository, opts, f"bodies_{fmt}")
        result: dict = {"scenario": "bodies", "format": fmt}
        sampler = Sampler(server.proc.pid)
        try:
            http_port, grpc_port = ports(server)
            body = build_body(fmt, ready, opts)
            result.update(limit=body_limit(fmt, ready), body_bytes=len(body.body), shape=body.note)
            time.sleep(1)
            result["server_idle"] = usage_mb(server.proc.pid)
            lines_before = len(server.lines)
            sampler.start()
            senders = [Sender(http_port, body, opts.body_timeout) for _ in range(opts.body_threads)]
            for s in senders:
                s.start()
            result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate,
                                                        health=False), opts.body_window_seconds)
            for s in senders:
                s.stopped.set()
            deadline = time.monotonic() + opts.body_grace_seconds
            for s in senders:
                s.join(max(0.0, deadline - time.monotonic()))
            unfinished = [s for s in senders if s.is_alive()]
            answers = [a for s in senders for a in list(s.answers)]
            result["attack"] = {
                "requests": len(answers), "statuses": dict(Counter(status for status, _ in answers)),
                "seconds_median": round(statistics.median(t for _, t in answers), 3) if answers else None,
                "seconds_max": round(max((t for _, t in answers), default=0), 3),
                "unfinished_after_grace": len(unfinished),
                "unfinished_oldest_s": round(max((time.monotonic() - s.busy_since for s in unfinished
                                                  if s.busy_since), default=0), 1)}
            peak_rss, peak_threads = sampler.max_rss, sampler.max_threads
            sampler.stop()
            time.sleep(2)
            alive = server.proc.poll() is None
            result["server_max"] = {"rss_mb": round(peak_rss / 1024, 1), "threads": peak_threads}
            result["server_after"] = usage_mb(server.proc.pid) if alive else None
            result["server_log"] = log_digest(server.lines[lines_before:], distinct=4)
        finally:
            sampler.stop()
            result["stop"] = stop_server(server)
        result["seconds"] = round(time.monotonic() - began, 1)
        emit(result)
        results.append(result)
    return results


def scenario_trickle(repository: Path, opts: argparse.Namespace) -> dict:
    began = time.monotonic()
    server, ready = start_server(repository, opts, "trickle")
    result: dict = {"scenario": "trickle"}
    try:
        http_port, grpc_port = ports(server)
        time.sleep(1)
        result["server_before"] = usage_mb(server.proc.pid)
        lines_before = len(server.lines)
        flood = Flood(http_port, ["trickle"] * opts.trickle_connections, connect_timeout=opts.connect_timeout,
                      reconnect=True)
        flood.start()
        flood.ready.wait(opts.connect_timeout + 60)
        result["attack_open_s"] = flood.open_seconds
        result["victims"] = run_victims(victims_for(ready, http_port, grpc_port, opts.victim_rate, health=False),
                                        opts.window_seconds)
        end_flood(result, server, flood, lines_before)
    finally:
        result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


class DrainClient(threading.Thread):
    """One keep-alive connection, POST infer every `period`; 503 → retry on the same connection; a new connection
    only when the server closed the old one; stops when a reconnect is refused (the server is gone)."""

    def __init__(self, port: int, model: str, period: float, signalled: threading.Event) -> None:
        super().__init__(daemon=True, name="drain-client")
        self.port, self.period, self.signalled = port, period, signalled
        self.path, self.body = f"/v2/models/{model}/infer", kserve_image_json()
        self.counts: Counter = Counter()
        self.lost_errors: list[str] = []
        self.events: list[tuple[float, str]] = []  # (time, outcome) after SIGTERM
        self.stopped = threading.Event()

    def _note(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.signalled.is_set():
            self.events.append((time.monotonic(), outcome))

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopped.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                try:
                    conn.connect()
                except ConnectionRefusedError:
                    if self.signalled.is_set():
                        self._note("server_gone")
                        return
                    self._note("refused_before_sigterm")
                    conn = None
                    time.sleep(self.period)
                    continue
                except OSError as exc:
                    self._note(f"connect {type(exc).__name__}")
                    conn = None
                    time.sleep(self.period)
                    continue
                self.counts["connections"] += 1
            try:
                conn.request("POST", self.path, self.body, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                reply.read()
                self._note({200: "ok", 503: "refused_503"}.get(reply.status, f"http {reply.status}"))
                if reply.will_close:  # the server said Connection: close
                    self.counts["told_to_close"] += 1
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - the request is lost: it may or may not have run
                self._note("lost")
                self.lost_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
                conn = None
            time.sleep(self.period)
        if conn is not None:
            conn.close()


def scenario_drain(repository: Path, opts: argparse.Namespace) -> dict:
    began = time.monotonic()
    server, ready = start_server(repository, opts, "drain")
    result: dict = {"scenario": "drain"}
    signalled = threading.Event()
    clients: list[DrainClient] = []
    try:
        http_port, _ = ports(server)
        clients = [DrainClient(http_port, ready["model"], 0.05, signalled) for _ in range(opts.drain_clients)]
        for c in clients:
            c.start()
        time.sleep(opts.drain_after_seconds)
        since = len(server.records)
        sigterm = time.monotonic()
        signalled.set()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = server.wait_exit(90)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed: no exit within 90 s of SIGTERM"
        result["sigterm_to_exit_s"] = round(time.monotonic() - sigterm, 2)
        for c in clients:
            c.join(15)
        for c in clients:
            c.stopped.set()
        totals = sum((c.counts for c in clients), Counter())
        result["totals"] = dict(totals)
        result["per_client"] = [[c.counts["ok"], c.counts["refused_503"], c.counts["lost"]] for c in clients]
        result["lost_errors"] = dict(Counter(re.sub(r"\d+", "N", e) for c in clients for e in c.lost_errors))
        events = sorted(e for c in clients for e in c.events)

        def first(outcome: str, last: bool = False):
            times = [t - sigterm for t, o in events if o == outcome]
            return round((times[-1] if last else times[0]), 3) if times else None

        result["after_sigterm_s"] = {"last_ok": first("ok", last=True), "first_503": first("refused_503"),
                                     "last_503": first("refused_503", last=True), "first_lost": first("lost"),
                                     "last_lost": first("lost", last=True), "first_gone": first("server_gone")}
        drained = [r for r in server.records[since:] if r.get("event") == "drained"]
        result["drained"] = {k: v for k, v in drained[0].items() if k not in ("ts", "logger")} if drained else None
        result["stop"] = {"exit": code, "died_before_stop": False}
        if code != 0:
            result["stop"]["last_log"] = [line[:400] for line in server.lines[-12:]]
    finally:
        for c in clients:
            c.stopped.set()
        if server.proc.poll() is None and "stop" not in result:
            result["stop"] = stop_server(server)
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


