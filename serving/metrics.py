"""Prometheus metrics with Triton Inference Server's names, so existing Triton dashboards work unchanged.

    stats = ModelStats("lsoftmax_mnist_onnx", "1")       # one per served model; updated on the event loop
    registry = collector_registry([stats, ...])          # what serving.metrics_endpoint serves at /metrics

Per model (labels model, version), as Triton's own metrics endpoint has them:
  nv_inference_request_success             successful inference requests (ModelInfer, Classify, Embed)
  nv_inference_request_failure{reason}     failed ones; reason REJECTED (queue full), CANCELED (client gone or
                                           deadline), BACKEND (the model failed), OTHER (bad input, not ready, ...)
  nv_inference_count                       images inferred (a request of 8 images counts 8)
  nv_inference_exec_count                  backend executions (batches); < requests when batching works
  nv_inference_pending_request_count       requests queued for the backend right now (gauge)
  nv_inference_request_duration_us         cumulative end-to-end handler time of inference requests
  nv_inference_queue_duration_us           cumulative time requests waited in the batching queue
  nv_inference_compute_infer_duration_us   cumulative backend time, each request charged its whole batch (as Triton)
plus two histograms of our own: lsoftmax_inference_batch_size (images per backend execution) and
lsoftmax_inference_request_duration_seconds (per-request latency, for percentiles).

Triton's counters carry no `_total` suffix; prometheus_client's text format appends one to anything typed
`counter`, so they are exposed as untyped samples under Triton's exact names. Counting costs no locks on the
request path: the event loop (the only writer) bumps plain integers, and a custom collector reads them
when /metrics is scraped (from the endpoint's own thread).
The endpoint that serves them: serving.metrics_endpoint.
"""

from __future__ import annotations

import bisect
import contextvars
from typing import Iterable

from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, HistogramMetricFamily, UnknownMetricFamily

__all__ = ["ModelStats", "collector_registry", "charge", "charged", "REASONS", "BATCH_BUCKETS", "LATENCY_BUCKETS"]

REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Histogram:
    """Cumulative-at-scrape histogram: per-bucket counts, one bisect per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


class ModelStats:
    """The counters of one model. Written only from the event loop thread; read at scrape time."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.request_success = 0
        self.request_failure = dict.fromkeys(REASONS, 0)
        self.inference_count = 0
        self.exec_count = 0
        self.request_duration_ns = 0
        self.queue_duration_ns = 0
        self.compute_infer_duration_ns = 0
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.pending = 0  # requests queued for the backend; the batcher writes it as its queue changes

    def record_request(self, reason: str | None, duration_ns: int) -> None:
        """One inference RPC finished: reason None on success, else one of REASONS."""
        if reason is None:
            self.request_success += 1
        else:
            self.request_failure[reason] += 1
        self.request_duration_ns += duration_ns
        self.latency.observe(duration_ns * 1e-9)

    def record_execution(self, images: int, queue_ns: int, requests: int, compute_ns: int) -> None:
        """One backend execution of `images` images from `requests` queue entries that waited queue_ns in all."""
        self.exec_count += 1
        self.inference_count += images
        self.queue_duration_ns += queue_ns
        self.compute_infer_duration_ns += compute_ns * requests
        self.batch_size.observe(images)


_CHARGED: contextvars.ContextVar["ModelStats | None"] = contextvars.ContextVar("charged_model", default=None)


def charge(stats: ModelStats) -> None:
    """Called by a servicer once it knows which model an inference call is for: the RPC boundary records the
    call's outcome and duration on that model's counters (each call runs in its own task and context)."""
    _CHARGED.set(stats)


def charged() -> ModelStats | None:
    """The model the current call was charged to, if any (read by the RPC boundary when the call ends)."""
    return _CHARGED.get()


_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.request_success),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     lambda s: s.exec_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (includes cached requests)",
     lambda s: s.request_duration_ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds (includes cached requests)",
     lambda s: s.queue_duration_ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds (does not include cached requests)",
     lambda s: s.compute_infer_duration_ns // 1000),
)


class _Collector:
    def __init__(self, stats: Iterable[ModelStats]) -> None:
        self._stats = list(stats)

    def collect(self):
        labels = ["model", "version"]
        for name, doc, read in _COUNTERS:
            family = UnknownMetricFamily(name, doc, labels=labels)
            for s in self._stats:
                family.add_metric([s.model, s.version], read(s))
            yield family
            if name == "nv_inference_request_success":
                failure = UnknownMetricFamily("nv_inference_request_failure",
                                              "Number of failed inference requests, all batch sizes",
                                              labels=["model", "version", "reason"])
                for s in self._stats:
                    for reason, count in s.request_failure.items():
                        failure.add_metric([s.model, s.version, reason], count)
                yield failure
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Instantaneous number of pending requests awaiting execution per-model.",
                                    labels=labels)
        batch = HistogramMetricFamily("lsoftmax_inference_batch_size", "Images per backend execution",
                                      labels=labels)
        latency = HistogramMetricFamily("lsoftmax_inference_request_duration_seconds",
                                        "End-to-end duration of inference requests in seconds", labels=labels)
        for s in self._stats:
            pending.add_metric([s.model, s.version], s.pending)
            batch.add_metric([s.model, s.version], s.batch_size.buckets(), s.batch_size.sum)
            latency.add_metric([s.model, s.version], s.latency.buckets(), s.latency.sum)
        yield pending
        yield batch
        yield latency


def collector_registry(stats: Iterable[ModelStats]) -> CollectorRegistry:
    """A registry holding only these models' metrics (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return registry
