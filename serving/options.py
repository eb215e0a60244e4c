"""The server's command line (`python -m serving --help`): every flag, its default and its meaning."""

from __future__ import annotations

import argparse
import os

from serving.backends import BACKENDS, DEVICES
from serving.images.budget import DEFAULT_MAX_DECODE_BYTES
from serving.images.decoding import DEFAULT_MAX_IMAGE_PIXELS
from serving.logs import LOG_LEVELS
from serving.precision import PRECISION_CHOICES
from serving.security import TOKEN_ENV
from serving.grpc.typed import Limits

__all__ = ["get_args_parser", "DEFAULT_INLINE_BELOW_US", "DEFAULT_QUEUE_DELAY_US", "DEFAULT_QUEUE_SIZE", "DEFAULT_MAX_CONCURRENT_RPCS",
           "DEFAULT_INTRA_OP_THREADS"]

DEFAULT_INLINE_BELOW_US = 100  # above the thread hand-off's cost, below this net's batch on the CPU (BENCHMARKS.md)
DEFAULT_QUEUE_DELAY_US = 0  # measured best on CPU (loadgen sweep): a busy backend already gathers the next batch
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_INTRA_OP_THREADS = 1  # measured: see --intra-op-threads' help
DEFAULT_MAX_CONCURRENT_RPCS = 512  # beyond it gRPC answers RESOURCE_EXHAUSTED; bounds memory held by requests


def _positive(kind, maximum=None, minimum=1):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{f' and <= {maximum}' if maximum else ''}, got {text}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    limits = Limits()
    p = argparse.ArgumentParser(prog="python -m serving", description="Serve an exported L-Softmax MNIST model over gRPC.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", required=True, help="model repository written by `python -m export`")
    p.add_argument("--model", default=None,
                   help="serve only this model directory (default: all; the typed API serves the ONNX one)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                   help="serve only the repository's model of this format (default: all)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when a GPU is present, else CPU")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="which ONNX model the typed API serves when the repository holds both (export --int8): auto "
                        "serves INT8 where ONNX Runtime runs on the CPU and FP32 on CUDA; fp32 or int8 forces one "
                        "(int8 needs the INT8 model). Each answers with its own fitted temperature and threshold")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (see the `listening` log line)")
    p.add_argument("--http-port", type=_positive(int, maximum=65535, minimum=-1), default=8000,
                   help="HTTP/REST port (KServe v2 REST, the typed API as JSON, the page at /; see docs/http_api.md) "
                        "on --host, with the same TLS and token; 0 picks a free port (the `listening` log line says "
                        "which), -1 turns HTTP off")
    p.add_argument("--http-cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browsers on this origin (e.g. https://app.example.com) to call the HTTP API; "
                        "repeatable; none: no cross-origin access")
    p.add_argument("--http-body-timeout", type=_seconds, default=30.0,
                   help="seconds an HTTP request body may take to arrive; slower ones get 408 (a body still "
                        "arriving holds no --max-concurrent-rpcs slot)")
    p.add_argument("--max-images-per-request", type=_positive(int), default=limits.max_images_per_request,
                   help="more images in one request → RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=_positive(int, 2**31 - 1), default=limits.max_message_bytes,
                   help="largest request message accepted (gRPC answers RESOURCE_EXHAUSTED beyond it)")
    p.add_argument("--max-image-pixels", type=_positive(int), default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="largest declared width x height of an encoded image → INVALID_ARGUMENT beyond it")
    p.add_argument("--max-request-pixels", type=_positive(int), default=limits.max_request_pixels,
                   help="largest sum of declared width x height over one request's encoded images → "
                        "RESOURCE_EXHAUSTED beyond it")
    p.add_argument("--decode-threads", type=_positive(int), default=min(2, os.cpu_count() or 1),
                   help="threads decoding encoded images, in each of the two lanes (small and large images)")
    p.add_argument("--max-decode-queue", type=_positive(int), default=8,
                   help="large images (over 512x512 pixels) waiting for or in decoding, over all requests; a request "
                        "that would exceed it gets RESOURCE_EXHAUSTED at once")
    p.add_argument("--max-decode-memory-mb", type=_positive(int), default=DEFAULT_MAX_DECODE_BYTES >> 20,
                   help="memory all image decoding may hold at once, server-wide: each large image is charged its "
                        "decoding peak (about 7 bytes per declared pixel in colour, 2 in grey) before it starts; one "
                        "that does not fit now waits (within its deadline), one larger than all of it is refused "
                        "with RESOURCE_EXHAUSTED")
    p.add_argument("--intra-op-threads", type=_positive(int, maximum=256), default=DEFAULT_INTRA_OP_THREADS,
                   help="threads one backend call may use (ONNX Runtime's intra_op_num_threads; torch.set_num_threads "
                        "for TorchScript). 1 measured best on 2 CPU cores: the event loop, gRPC's poller and the "
                        "decoders need a core between backend calls, and a second intra-op thread costs a wake-up "
                        "per operator of a small net (see BENCHMARKS.md); raise it on machines with many "
                        "cores and large batches")
    p.add_argument("--max-concurrent-rpcs", type=_positive(int), default=DEFAULT_MAX_CONCURRENT_RPCS,
                   help="calls handled at once; gRPC refuses more with RESOURCE_EXHAUSTED")
    c = p.add_argument_group("connections (serving.connection_limits; README: Connections and request bodies)")
    c.add_argument("--max-connections", type=_positive(int, minimum=0), default=0,
                   help="open connections per port (HTTP and gRPC each); beyond it HTTP closes the connection quiet "
                        "longest and gRPC refuses the new one. 0: derived from the open-file limit (raised to its "
                        "hard limit at start), at most 4096; never more than that limit leaves room for")
    c.add_argument("--header-timeout", type=_seconds, default=30.0,
                   help="seconds a new connection has to send a complete HTTP request head (or a kept-alive one from "
                        "its next request's first byte), to finish a TLS handshake, to start HTTP/2 on the gRPC "
                        "port, and an HTTP client to read a reply: connections that say nothing or trickle are closed")
    c.add_argument("--idle-timeout", type=_seconds, default=60.0,
                   help="seconds an HTTP keep-alive connection may wait for its next request")
    c.add_argument("--grpc-max-connection-idle", type=_seconds, default=120.0,
                   help="seconds a gRPC connection may go without calls before the server sends GOAWAY (clients "
                        "reconnect when they next call)")
    c.add_argument("--grpc-max-connection-age", type=_positive(float, minimum=0), default=3600.0,
                   help="seconds after which a gRPC connection is told to go (GOAWAY) so clients reconnect and "
                        "spread over replicas and --workers; its calls get --grpc-max-connection-age-grace to "
                        "finish. 0: no limit")
    c.add_argument("--grpc-max-connection-age-grace", type=_positive(float, minimum=0), default=30.0,
                   help="seconds the calls of a connection past its age get to finish")
    c.add_argument("--grpc-keepalive-time", type=_seconds, default=60.0,
                   help="the server pings a gRPC connection quiet this long and closes it when the ping is not "
                        "answered within 20 s (a peer that vanished)")
    c.add_argument("--grpc-min-ping-interval", type=_seconds, default=10.0,
                   help="shortest interval between a client's keepalive pings; a client that pings more often "
                        "twice is sent GOAWAY (ENHANCE_YOUR_CALM)")
    b = p.add_argument_group("dynamic batching (serving.backends.batching)")
    b.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="coalesce concurrent requests into one backend call (--no-dynamic-batching: one call each)")
    b.add_argument("--max-batch-size", type=_positive(int), default=None,
                   help="most images per backend call; larger requests are split (default: the model's "
                        "max_batch_size from config.pbtxt / manifest.json, 256 if neither says)")
    b.add_argument("--max-queue-delay-us", type=_positive(int, minimum=0), default=DEFAULT_QUEUE_DELAY_US,
                   help="longest a request may wait for others to join its batch, and only when the last batch held "
                        "more requests than are queued (a lone request never waits); >0 can pay off on a GPU, on "
                        "CPU requests queued while the backend is busy already form the batches")
    b.add_argument("--inline-below-us", type=_positive(int, minimum=0), default=DEFAULT_INLINE_BELOW_US,
                   help="run a lone client's batch on the event loop, not the inference thread, while the model's "
                        "recent batches took less than this on average: the thread hand-off costs more than a cheap "
                        "batch (a tiny model, or this net on a GPU); concurrent callers' batches stay in the thread; "
                        "0: always the thread")
    b.add_argument("--max-queue-size", type=_positive(int, minimum=0), default=DEFAULT_QUEUE_SIZE,
                   help="requests queued per model before new ones get UNAVAILABLE 'Exceeds maximum queue size' "
                        "(0: unbounded)")
    p.add_argument("--metrics-port", type=_positive(int, maximum=65535, minimum=-1), default=8002,
                   help="Prometheus endpoint http://HOST:PORT/metrics with Triton's metric names (https with "
                        "--tls-cert); 0 picks a free port (see the `listening` log line), -1 turns it off")
    t = p.add_argument_group("security (serving.security)")
    t.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    t.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    t.add_argument("--tls-client-ca", default=None,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    t.add_argument("--auth-token-file", default=None,
                   help=f"file holding the bearer token every call but health checks must send as "
                        f"`authorization: Bearer <token>` (also: env {TOKEN_ENV}; none: no token needed)")
    t.add_argument("--auth-token", default=None,
                   help="the token itself (visible in the process list; prefer --auth-token-file)")
    p.add_argument("--workers", type=_positive(int, maximum=256), default=1,
                   help="server processes sharing the ports (Linux, SO_REUSEPORT), each with its own event loop, "
                        "batcher and model sessions, under a parent that restarts them and sums their metrics; the "
                        "kernel spreads connections, not calls, over them (clients: open several connections). "
                        "1: one process, no parent")
    p.add_argument("--grace-seconds", type=float, default=10.0, help="time in-flight calls get to finish on SIGTERM")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="debug logs one line per request")
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="json: one object per line")
    return p
