"""What one server process allows its clients' connections, decided in one place from the flags and the open-file
limit: the HTTP port's connection policy (serving.http.connections), the gRPC server's channel arguments, and
the descriptors left for everything else.

Every connection holds a file descriptor, and a process that runs out of them can accept nothing on any port and
open no file. So at start the soft RLIMIT_NOFILE is raised to the hard limit (as Go's runtime and nginx's
worker_rlimit_nofile do), and each port's connection cap is derived from what that leaves: the descriptors open
now, those the metrics endpoint may hold, and RESERVED_FDS for the models, the decoders and the log are set
aside (RESERVED_FDS is at most an eighth of a small limit); the HTTP and gRPC ports share the rest, at most MAX_CONNECTIONS_DEFAULT each. --max-connections sets the
cap instead, but never above that share.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
from dataclasses import dataclass

from serving.core.errors import UsageError
from serving.http.connections import ConnectionPolicy
from serving.logs import log_event

__all__ = ["ConnectionLimits", "raise_open_files_limit", "MAX_CONNECTIONS_DEFAULT", "RESERVED_FDS",
           "METRICS_MAX_CONNECTIONS"]

logger = logging.getLogger("serving")

MAX_CONNECTIONS_DEFAULT = 4096  # per port: far beyond what 2 cores answer at once, a bounded memory for idle ones
RESERVED_FDS = 128  # model files, decoder and ONNX Runtime threads' files, the log (at most 1/8 of the limit)
METRICS_MAX_CONNECTIONS = 64  # the Prometheus endpoint's own cap (serving.metrics_endpoint)
MIN_CONNECTIONS = 8  # below this a port cannot serve a few clients: refuse to start instead


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


@dataclass(frozen=True)
class ConnectionLimits:
    open_files: int  # the soft limit after raising it
    http: ConnectionPolicy
    grpc_max_connections: int
    grpc_options: tuple[tuple[str, int], ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace, announce: bool = True) -> "ConnectionLimits":
        before, soft, hard = raise_open_files_limit()
        share = (soft - _open_descriptors() - min(RESERVED_FDS, soft // 8) - METRICS_MAX_CONNECTIONS) // 2
        if share < MIN_CONNECTIONS:
            raise UsageError(f"the open-file limit ({soft}) leaves {max(share, 0)} connections per port; raise it "
                             f"(ulimit -n, LimitNOFILE=) to at least {2 * MIN_CONNECTIONS + RESERVED_FDS + 256}")
        wanted = args.max_connections or MAX_CONNECTIONS_DEFAULT
        cap = min(wanted, share)
        if args.max_connections and args.max_connections > share:
            log_event(logger, logging.WARNING, "max_connections_lowered", asked=args.max_connections, allowed=share,
                      open_files=soft, hint="the open-file limit cannot hold that many connections on both ports")
        http = ConnectionPolicy(max_connections=cap, header_timeout=args.header_timeout,
                                idle_timeout=args.idle_timeout, write_timeout=args.header_timeout)
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        grpc_options = (
            ("grpc.max_allowed_incoming_connections", cap),
            ("grpc.server_handshake_timeout_ms", ms(args.header_timeout)),  # silent connects, TLS and HTTP/2 preface
            ("grpc.max_connection_idle_ms", ms(args.grpc_max_connection_idle)),
            ("grpc.max_connection_age_ms", ms(args.grpc_max_connection_age) if args.grpc_max_connection_age
             else 2**31 - 1),
            ("grpc.max_connection_age_grace_ms", ms(args.grpc_max_connection_age_grace)),
            # the server pings a connection quiet this long and drops it when the ping goes unanswered
            ("grpc.keepalive_time_ms", ms(args.grpc_keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(min(20.0, args.grpc_keepalive_time))),
            # a client may ping (keepalive) at most this often, with or without calls; two pings sooner: GOAWAY
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(args.grpc_min_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
        )
        limits = cls(open_files=soft, http=http, grpc_max_connections=cap, grpc_options=grpc_options)
        if announce:
            log_event(logger, logging.INFO, "connection_limits", open_files=soft, open_files_before=before,
                      open_files_hard=hard, max_connections_per_port=cap, header_timeout_s=args.header_timeout,
                      idle_timeout_s=args.idle_timeout, grpc_max_connection_idle_s=args.grpc_max_connection_idle,
                      grpc_max_connection_age_s=args.grpc_max_connection_age)
        return limits
