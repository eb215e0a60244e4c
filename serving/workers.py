"""`python -m serving ... --workers N`: N server processes on the same ports under one parent (Linux: SO_REUSEPORT).

One server process handles its calls on one event loop, so on one core; --workers N runs N of them
(docs/architecture.md §7). The parent claims the gRPC and HTTP ports (bound, never listening: a port another
program holds is an error, and port 0 is chosen once for all), serves the public metrics (serving.worker_metrics:
the workers' sums), and starts N workers: the same program with the same flags but those ports, a private metrics
socket in a 0700 folder and a control socket (env LSOFTMAX_SERVING_WORKER). Each worker is today's server (its own
event loop, batcher, decoders, model sessions) that loads its models before it listens, tags its log lines with
`worker` and logs `worker_listening` / `worker_ready` / `worker_stopped`; the parent logs `listening` and `ready`
(the single server's fields, plus `workers`, `worker_pids`) once every worker is ready.
A worker that exits is replaced (`worker_exited`, `worker_started`): at once if it had been ready, else after
RESTART_BACKOFF_S doubling; after MAX_START_FAILURES failed starts in a row, or any failure while the first workers
start (a broken repository breaks all alike), the parent gives up (`workers_failed`, `error: ...` with the worker's
reason), drains the others and exits 1 (2 for a usage error). SIGTERM/SIGINT: every worker is told to drain over its
control socket, not by a signal, so one sent to the whole process group (systemd, Ctrl-C) does not count twice; a
second signal tells them to stop at once; the parent exits when all have (0 if all exited 0), killing any left
--grace-seconds + STOP_MARGIN_S after the first. A worker whose parent dies sees the control socket close: a drain.

This module is the parent's side; a worker's side of the link (the env var, the control socket) is serving.worker_link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily

from serving.connection_limits import raise_open_files_limit
from serving.core.errors import StartupError, UsageError
from serving.logs import log_event
from serving.metrics_endpoint import MetricsServer
from serving.security import TlsConfig, TokenAuth, read_token
from serving.worker_link import WORKER_ENV, worker_spec
from serving.worker_metrics import SummedMetrics

__all__ = ["supervise", "MAX_START_FAILURES"]

logger = logging.getLogger("serving")

MAX_START_FAILURES = 3  # failed starts in a row (exited before ready) before the parent gives up
RESTART_BACKOFF_S = 1.0  # after the first failed start; doubled after each further one
STOP_MARGIN_S = 10.0  # beyond --grace-seconds, before workers that have not exited are killed


def _entry() -> list[str]:
    """How this program was started, for its workers: `-m package` or the script (tests' gated server)."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__")]
    return [os.path.abspath(main.__file__)]


def _claim(host: str, port: int, refusal: str) -> socket.socket:
    """Bind host:port as a server would, then open it to SO_REUSEPORT for the workers; kept bound, not listening,
    so nothing else takes the port meanwhile. SO_REUSEADDR as gRPC and aiohttp set it (a previous run's TIME_WAIT
    connections are no obstacle; so two parents whose workers all still load can both bind one fixed port)."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise StartupError(f"cannot bind {host}:{port} ({exc.strerror or exc}){refusal}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {host}:{port} ({exc.strerror or exc}){refusal}") from None
    return sock


def _exit_description(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


@dataclass
class _Slot:
    """One worker position: the process filling it now, and how its starts went."""
    index: int
    starts: int = 0
    process: asyncio.subprocess.Process | None = None
    control: asyncio.StreamWriter | None = None
    running: bool = False  # from the spawn until its exit has been handled
    socket_path: str = ""  # its private metrics socket (scraped once it listens)
    listening: dict | None = None
    ready: dict | None = None
    started: float = 0.0
    failures: int = 0  # failed starts in a row
    error: str | None = None  # its startup_failed reason
    restart: asyncio.TimerHandle | None = None


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.slots = [_Slot(i) for i in range(args.workers)]
        self.guards: list[socket.socket] = []
        self.metrics: MetricsServer | None = None
        self.folder: str | None = None
        self.order: str | None = None  # None, then "drain", then "stop"
        self.signals = 0
        self.announced: set[str] = set()
        self.restarts = 0
        self.status = 0
        self.port = self.http_port = -1
        self.done: asyncio.Event | None = None
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            self._claim_ports()
            self.folder = tempfile.mkdtemp(prefix="lsoftmax-serve-workers-")  # 0700: the metrics sockets' folder
            self._start_metrics()
            for slot in self.slots:
                self._start(slot)
            self._check_done()
            await self.done.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self.metrics is not None:
                self.metrics.close()
            for guard in self.guards:
                guard.close()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
        log_event(logger, logging.INFO, "stopped", status=self.status, restarts=self.restarts)
        return self.status

    # --- before any worker ---

    def _claim_ports(self) -> None:
        args = self.args
        guard = _claim(args.host, args.port, "")
        self.guards.append(guard)
        self.port = guard.getsockname()[1]
        if args.http_port >= 0:
            guard = _claim(args.host, args.http_port, "; choose another --http-port (0: any free port, -1: no HTTP)")
            self.guards.append(guard)
            self.http_port = guard.getsockname()[1]

    def _start_metrics(self) -> None:
        """The public endpoint, with the server's TLS and token: each scrape sums the workers' own."""
        args = self.args
        if args.metrics_port < 0:
            return
        tls = TlsConfig.from_args(args.tls_cert, args.tls_key, args.tls_client_ca)
        if tls is not None:
            tls.server_credentials()  # its clear errors for unreadable or broken files
        token = read_token(args.auth_token, args.auth_token_file)
        auth = TokenAuth(token).check_header if token else None
        summed = SummedMetrics(self._metrics_sockets, self._own_metrics)
        self.metrics = MetricsServer.serve(summed.render, args.host, args.metrics_port, tls.cert if tls else None,
                                           tls.key if tls else None, tls.client_ca if tls else None, auth)

    def _metrics_sockets(self) -> list[tuple[tuple[int, int], str]]:
        """(worker, start) and its metrics socket, for every worker listening now (read from the endpoint's thread)."""
        return [((s.index, s.starts), s.socket_path) for s in list(self.slots) if s.listening is not None]

    def _own_metrics(self) -> list:
        configured = GaugeMetricFamily("lsoftmax_workers", "Worker processes configured (--workers)",
                                       value=len(self.slots))
        ready = GaugeMetricFamily("lsoftmax_workers_ready", "Worker processes serving now",
                                  value=sum(1 for s in self.slots if s.ready is not None))
        restarts = UnknownMetricFamily("lsoftmax_worker_restarts", "Workers replaced since the server started",
                                       value=self.restarts)
        return [configured, ready, restarts]

    # --- workers ---

    def _worker_spec(self, slot: _Slot, control_fd: int) -> str:
        args = {**vars(self.args), "port": self.port, "http_port": self.http_port, "metrics_port": -1, "workers": 1}
        return worker_spec(slot.index, control_fd, args, slot.socket_path)

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        if self.order is None:
            slot.running = True
            task = asyncio.ensure_future(self._run_worker(slot))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run_worker(self, slot: _Slot) -> None:
        """Spawn one worker, follow its messages, handle its exit (whatever goes wrong here)."""
        slot.starts += 1
        slot.listening = slot.ready = slot.error = slot.process = None
        slot.started = 0.0
        slot.socket_path = os.path.join(self.folder, f"worker-{slot.index}-{slot.starts}.sock")
        code = 1
        try:
            code = await self._spawn_and_follow(slot)
        except Exception as exc:  # noqa: BLE001 (a failed spawn or a bug here: as if the worker had failed)
            slot.error = slot.error or f"cannot run a worker process ({exc!r})"
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()
                code = await slot.process.wait()
        finally:
            pid = slot.process.pid if slot.process is not None else None
            if slot.control is not None:
                slot.control.close()
            slot.process = slot.control = None
            self._exited(slot, pid, code)

    async def _spawn_and_follow(self, slot: _Slot) -> int:
        parent_end, child_end = socket.socketpair()
        try:
            env = {**os.environ, WORKER_ENV: self._worker_spec(slot, child_end.fileno())}
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable, *_entry(), env=env, stdin=subprocess.DEVNULL, pass_fds=(child_end.fileno(),))
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        slot.started = time.monotonic()
        reader, slot.control = await asyncio.open_connection(sock=parent_end)
        log_event(logger, logging.INFO, "worker_started", worker=slot.index, pid=slot.process.pid, start=slot.starts)
        if self.order is not None:
            slot.control.write(f"{self.order}\n".encode())
        try:
            async for line in reader:
                self._on_message(slot, json.loads(line))
        except (ValueError, ConnectionError):  # a line that is not ours: stop listening, wait for the exit
            pass
        return await slot.process.wait()

    def _on_message(self, slot: _Slot, message: dict) -> None:
        event = message.get("event")
        if event == "listening":
            slot.listening = message.get("fields", {})
            self._announce("listening", lambda s: s.listening)
        elif event == "ready":
            slot.ready = message.get("fields", {})
            slot.failures = 0
            self._announce("ready", lambda s: s.ready)
        elif event == "startup_failed":
            slot.error = message.get("error")

    def _announce(self, event: str, fields: Callable[[_Slot], dict | None]) -> None:
        """The server's own `listening` / `ready`, once, when every worker has said it."""
        if event in self.announced or self.order is not None or any(fields(s) is None for s in self.slots):
            return
        self.announced.add(event)
        log_event(logger, logging.INFO, event, **{**fields(self.slots[0]), "pid": os.getpid(),
                                                  "metrics_port": self.metrics.port if self.metrics else None,
                                                  "workers": len(self.slots),
                                                  "worker_pids": [s.process.pid for s in self.slots if s.process]})

    def _exited(self, slot: _Slot, pid: int | None, code: int) -> None:
        """A worker has exited: during a stop, count it; else replace it, or give up."""
        was_ready = slot.ready is not None
        slot.running, slot.ready, slot.listening = False, None, None
        with contextlib.suppress(OSError):
            os.unlink(slot.socket_path)
        restart_in = None
        if self.order is not None:
            if code != 0:
                self.status = self.status or 1
        elif "ready" not in self.announced or slot.failures + (not was_ready) >= MAX_START_FAILURES:
            tries = "" if "ready" not in self.announced else f" {MAX_START_FAILURES} times in a row"
            self._give_up(f"worker {slot.index} could not start{tries}: "
                          f"{slot.error or _exit_description(code)}", code)
        else:
            slot.failures = 0 if was_ready else slot.failures + 1
            restart_in = 0.0 if was_ready else RESTART_BACKOFF_S * 2 ** (slot.failures - 1)
            self.restarts += 1
            slot.restart = asyncio.get_running_loop().call_later(restart_in, self._start, slot)
        log_event(logger, logging.WARNING if self.order is None or code != 0 else logging.INFO, "worker_exited",
                  worker=slot.index, pid=pid, status=code, reason=_exit_description(code), was_ready=was_ready,
                  uptime_s=round(time.monotonic() - slot.started, 3) if slot.started else None,
                  restart_in_s=restart_in)
        self._check_done()

    def _give_up(self, message: str, code: int) -> None:
        self.status = 2 if code == 2 else 1
        log_event(logger, logging.ERROR, "workers_failed", error=message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        self._send("drain")

    # --- stopping ---

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        log_event(logger, logging.INFO, "signal", signal=signal.Signals(signum).name, count=self.signals)
        self._send("drain" if self.signals == 1 else "stop")

    def _send(self, order: str) -> None:
        """Tell every worker (and any still starting, once it connects) to drain or to stop."""
        if self.order is None:
            log_event(logger, logging.INFO, "stopping", grace_seconds=self.args.grace_seconds, workers=len(self.slots))
            asyncio.get_running_loop().call_later(self.args.grace_seconds + STOP_MARGIN_S, self._kill_stragglers)
        self.order = order if self.order != "stop" else "stop"
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
            if slot.control is not None:
                slot.control.write(f"{self.order}\n".encode())
        self._check_done()

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log_event(logger, logging.WARNING, "worker_killed", worker=slot.index, pid=slot.process.pid,
                          reason=f"still running {self.args.grace_seconds + STOP_MARGIN_S:g} s after the stop began")
                slot.process.kill()
                self.status = self.status or 1

    def _check_done(self) -> None:
        if self.order is not None and not any(s.running for s in self.slots):
            self.done.set()


def supervise(args: argparse.Namespace) -> int:
    """Run the parent of --workers N until every worker has exited; returns the exit status."""
    if not sys.platform.startswith("linux"):
        raise UsageError("--workers above 1 needs Linux (the kernel spreads connections over SO_REUSEPORT sockets)")
    raise_open_files_limit()  # the workers inherit it and derive their connection caps from it
    return asyncio.run(Supervisor(args).run())
