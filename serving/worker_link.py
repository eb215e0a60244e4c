"""A --workers worker's link to its parent: the environment variable that hands it its settings and the control
socket it reports on (JSON lines up: listening, ready, startup_failed) and takes orders from (words down: drain, stop).

It exists apart from serving.workers (the parent's supervisor) because a worker needs only this side; both sides
share the variable's name and the settings' format from here, and nothing here imports the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable

__all__ = ["WorkerLink", "WORKER_ENV", "worker_spec"]

WORKER_ENV = "LSOFTMAX_SERVING_WORKER"


def worker_spec(index: int, control_fd: int, args: dict, metrics_socket: str) -> str:
    """What the parent puts in WORKER_ENV for one worker, read back by WorkerLink.from_env()."""
    return json.dumps({"index": index, "control_fd": control_fd, "args": args, "metrics_socket": metrics_socket})


class _WorkerTag(logging.Filter):
    """Adds `worker` to every record's fields, so one stream of log lines from N processes can be told apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.index}
        return True


@dataclass
class WorkerLink:
    """A worker's side of its parent: its index, its flags, its private metrics socket and the control socket
    (JSON lines up: listening, ready, startup_failed; words down: drain, stop)."""
    index: int
    args: argparse.Namespace
    metrics_socket: str
    control: socket.socket

    @classmethod
    def from_env(cls) -> "WorkerLink | None":
        """The link a parent handed this process, or None when it was not started as a worker."""
        spec = os.environ.pop(WORKER_ENV, None)
        if spec is None:
            return None
        spec = json.loads(spec)
        return cls(spec["index"], argparse.Namespace(**spec["args"]), spec["metrics_socket"],
                   socket.socket(fileno=spec["control_fd"]))

    def tag_logs(self) -> None:
        """Every log line of this process carries `worker`: its index (set up logging first)."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerTag(self.index))

    def send(self, event: str, **fields) -> None:
        try:
            self.control.sendall((json.dumps({"event": event, **fields}, default=str) + "\n").encode())
        except OSError:
            pass  # the parent is gone: the control socket's end, seen by watch(), stops this worker

    def watch(self, loop: asyncio.AbstractEventLoop, order: Callable[[bool, str], None]) -> None:
        """Call order(forced, reason) for each word from the parent: drain (False) or stop (True); the socket's
        end (the parent died) is a drain."""
        self.control.setblocking(False)
        pending = bytearray()

        def readable() -> None:
            try:
                data = self.control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.control.fileno())
                order(False, "parent_gone")
                return
            pending.extend(data)
            *words, rest = pending.split(b"\n")
            pending[:] = rest
            for word in words:
                if word in (b"drain", b"stop"):
                    order(word == b"stop", f"parent_{word.decode()}")

        loop.add_reader(self.control.fileno(), readable)
