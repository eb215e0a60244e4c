"""`python -m serving` in a subprocess, for tests, the demo, benchmarks and the README check: one way to do it.

    with ServerProcess(repo, "--backend", "onnx").start() as server:     # waits for the `ready` log line
        server.address, server.metrics_port                             # read back from the `listening` line
        ...
    # leaving the block: SIGTERM, and the exit status must be 0

The server is started with --port 0 and --metrics-port 0 (the OS picks free ports: nothing binds, releases and
hopes) and JSON logs; its stderr is read line by line on a thread, so callers wait on log events
(`listening`, `ready`, `drained`, `stopped`, ...) instead of polling. `log_path` also writes every line to a file.
It runs in the project root unless `cwd` names another copy of serving/ (an older commit's, for bench.serve_ab's
A/B); `env` adds environment variables; `entry` replaces `-m serving` with another program taking the same flags
(tests/serving/gated_server.py: the server with test-controlled gates).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["ServerProcess", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`python -m serving` in a subprocess, with its JSON log lines collected as they arrive."""

    def __init__(self, repository: Path | str, *args: str, log_path: Path | str | None = None,
                 python: str = sys.executable, log_level: str = "debug", cwd: Path | str = PROJECT_ROOT,
                 env: dict[str, str] | None = None, entry: Sequence[str] = ("-m", "serving")) -> None:
        defaults = {"--port": "0", "--metrics-port": "0", "--http-port": "0", "--log-level": log_level}
        if not (Path(cwd) / "serving" / "http").is_dir():  # an older serving/ (bench.serve_ab) without HTTP
            del defaults["--http-port"]
        given = set(args)
        cmd = [python, *entry, "--model-repository", str(repository), "--log-format", "json", *args]
        for flag, value in defaults.items():
            if flag not in given:
                cmd += [flag, value]
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.command = cmd
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.records: list[dict] = []
        self.lines: list[str] = []
        self.address: str | None = None
        self._log = open(log_path, "w") if log_path else None
        self._changed = threading.Condition()  # notified for each record and at EOF
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._changed:
                self.records.append(record)
                self._changed.notify_all()
        if self._log is not None:
            self._log.close()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, event: str, timeout: float = 60.0, match: Callable[[dict], bool] | None = None,
                 since: int = 0) -> dict:
        """Block until the server logs `event` (and `match(record)` holds, when given), looking at records from
        index `since` on (`len(server.records)` taken before an action: only what the server logged after it);
        AssertionError with the log if it exits or times out first."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._changed:
            while True:
                for record in self.records[seen:]:
                    if record.get("event") == event and (match is None or match(record)):
                        return record
                seen = len(self.records)
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event!r} within {timeout} s; log:\n" + "\n".join(self.lines))
                self._changed.wait(left)
        raise AssertionError(f"server exited ({self.proc.wait()}) before {event!r}; log:\n" + "\n".join(self.lines))

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        """Wait until the server listens (address known) and every model is loaded and warm (`ready`)."""
        self.address = self.wait_for("listening", timeout)["address"]
        self.wait_for("ready", timeout)
        return self

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_cleanly()

    @property
    def port(self) -> int:
        return int(self.wait_for("listening")["port"])

    @property
    def metrics_port(self) -> int | None:
        return self.wait_for("listening")["metrics_port"]

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS), KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server (once) and wait for its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the exit status without signalling: after a caller's own SIGTERM, a second signal from stop()
        would be the operator's "cut it short" and cancel the calls the drain is finishing."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop_cleanly(self) -> None:
        """SIGTERM and require exit status 0; a server that does not stop in time is killed, and that fails."""
        try:
            code = self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        assert code == 0, f"server exited with {code}; log:\n" + "\n".join(self.lines[-40:])
