"""The parent's /metrics under --workers: every worker's metrics, scraped per request and summed by (name, labels).

    summed = SummedMetrics(live_workers, own_metrics)   # live_workers() -> [(key, unix socket path), ...]
    MetricsServer.serve(summed.render, host, port, ...)  # each scrape: ask every worker at once, sum, render

Each worker serves its own metrics (serving.metrics) on a private unix socket (serving.metrics_endpoint's
start_unix, in a folder only the server's user may enter); the parent's public endpoint, with the server's TLS,
token and timeouts, answers a scrape by fetching all of them concurrently and adding up each sample: counters,
histogram buckets, sums and counts, and gauges (requests pending), so the values are the server's as a whole.

A worker that does not answer within SCRAPE_TIMEOUT_S counts with the counters it last reported (its gauges are
left out), and a worker that has exited keeps the counts it last reported in the sums, so a summed counter never
goes down when a worker is replaced (Prometheus would read that as a reset); what a killed worker counted after the
last scrape is lost with it. There are no process-level metrics to merge: the registry has none (serving.metrics);
the parent adds its own (lsoftmax_workers, lsoftmax_workers_ready, lsoftmax_worker_restarts: own_metrics()).
Runs on the endpoint's own thread and loop, never on the supervisor's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from serving.logs import log_event

__all__ = ["SummedMetrics", "SCRAPE_TIMEOUT_S"]

logger = logging.getLogger("serving.metrics")

SCRAPE_TIMEOUT_S = 2.0  # a worker's metrics thread answers in milliseconds, even with its event loop busy
MAX_REPLY_BYTES = 8 << 20  # a worker's whole exposition is a few KiB per model

SampleKey = tuple  # (sample name, ((label, value), ...) sorted)


@dataclass
class _Family:
    documentation: str
    kind: str  # prometheus_client's type: unknown (Triton's counters), gauge, histogram, ...
    values: dict[SampleKey, float] = field(default_factory=dict)


Families = dict[str, _Family]


def _parse(text: str) -> Families:
    families: Families = {}
    for family in text_string_to_metric_families(text):
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = _Family(family.documentation, family.type, values)
    return families


def _add(total: Families, part: Families, gauges: bool = True) -> None:
    """total += part, sample by sample (gauges only when `gauges`: a value that is not a count goes stale)."""
    for name, family in part.items():
        if family.kind == "gauge" and not gauges:
            continue
        into = total.setdefault(name, _Family(family.documentation, family.kind))
        for key, value in family.values.items():
            into.values[key] = into.values.get(key, 0.0) + value


async def _fetch(path: str) -> str:
    """GET /metrics from a worker's unix socket; the body (OSError or ValueError when it cannot say)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
        reply = bytearray()
        while chunk := await reader.read(65536):
            reply += chunk
            if len(reply) > MAX_REPLY_BYTES:
                raise ValueError(f"more than {MAX_REPLY_BYTES} bytes")
    finally:
        writer.close()
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    status = head.partition(b"\r\n")[0].decode("latin-1")
    if not status.startswith("HTTP/1.1 200 "):
        raise ValueError(f"answered {status!r}")
    return body.decode()


class _Exposition:
    """What generate_latest reads: anything with collect()."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class SummedMetrics:
    def __init__(self, live_workers: Callable[[], Iterable[tuple[Hashable, str]]],
                 own_metrics: Callable[[], Iterable[Metric]] = tuple, timeout: float = SCRAPE_TIMEOUT_S) -> None:
        self._live_workers = live_workers
        self._own_metrics = own_metrics
        self._timeout = timeout
        self._last: dict[Hashable, Families] = {}  # each live worker's last answer
        self._retired: Families = {}  # the last counts of workers that have exited
        self._retired_keys: set[Hashable] = set()

    async def _scrape(self, key: Hashable, path: str) -> Families | None:
        try:
            return _parse(await asyncio.wait_for(_fetch(path), self._timeout))
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log_event(logger, logging.WARNING, "worker_metrics_unavailable", source=key, error=repr(exc),
                      hint="its last scraped counts stand in for it")
            return None

    def _retire(self, key: Hashable) -> None:
        _add(self._retired, self._last.pop(key), gauges=False)
        self._retired_keys.add(key)

    async def render(self) -> bytes:
        """One scrape of the parent's endpoint: Prometheus text of the summed samples and the parent's own."""
        workers = [(key, path) for key, path in self._live_workers() if key not in self._retired_keys]
        live = {key for key, _ in workers}
        for key in [k for k in self._last if k not in live]:
            self._retire(key)
        answers = await asyncio.gather(*(self._scrape(key, path) for key, path in workers))
        for (key, _), answer in zip(workers, answers):
            if answer is not None and key not in self._retired_keys:  # (it may have exited while we waited)
                self._last[key] = answer
        total: Families = {}
        for (key, _), answer in zip(workers, answers):
            if key in self._retired_keys:  # exited while we waited: its last counts are in _retired now
                continue
            _add(total, answer if answer is not None else self._last.get(key, {}), gauges=answer is not None)
        _add(total, self._retired)
        metrics = []
        for name, family in total.items():
            metric = Metric(name, family.documentation, family.kind)
            for (sample, labels), value in family.values.items():
                metric.add_sample(sample, dict(labels), value)
            metrics.append(metric)
        return generate_latest(_Exposition([*metrics, *self._own_metrics()]))
