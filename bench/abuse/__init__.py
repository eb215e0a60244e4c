"""Hostile-but-cheap clients against a running server, and whether other ("victim") clients still get answers.

    python -m bench.abuse [--scenario connections|grpc-connections|bodies|trickle|drain ...] \\
        [--cwd DIR] [--label NAME] [--model-repository REPO] [--server-flags "--workers 2"] [--nofile 1024] \\
        [--window-seconds 60] [--observe-seconds 150] [--body-window-seconds 20] [--json OUT] [--log-dir DIR]

    # before/after: the same scenarios against an older commit's serving/ and the working tree
    rm -rf /tmp/before && mkdir -p /tmp/before && git archive COMMIT serving | tar -x -C /tmp/before
    python -m bench.abuse --cwd /tmp/before --label before --json /tmp/abuse_before.json
    python -m bench.abuse --label after --json /tmp/abuse_after.json
    python -m bench.abuse --cwd /tmp/before --label before-w2 --scenario connections --server-flags "--workers 2"

An attack that costs the attacker nothing (an open socket, a byte every two seconds, one request body) must not
cost the server its ability to answer everybody else. Each scenario starts its own server (bench.server_process,
in --cwd, so any checkout of serving/ can be measured the same way: serve_ab's A/B), lowered to --nofile open files
from its start (through prlimit: a real deployment's default, where a flood of sockets exhausts descriptors long
before memory), attacks it from this process, measures the victims meanwhile, and stops it with SIGTERM:

- connections: --attack-connections TCP connections to the HTTP port, a third each silent (connect, send nothing),
  slowloris (a request head that never ends: one header byte every 2 s) and idle keep-alive (one cheap request,
  then silence). Once they are open (or failed: counted), for --window-seconds one thread each calls gRPC Classify,
  REST infer on a fresh connection per call, and the gRPC health check at ~20/s. Reported: victim calls, failures
  and latency; how many attacker connections the server closed and how long after connecting (watched for up to
  --observe-seconds after the window); how much the server logged meanwhile (a log an attacker can grow at will
  fills a disk); the server's RSS and threads (all its processes) before and after.
- grpc-connections: the same against the gRPC port: silent connections, and ones that send the HTTP/2 preface and
  an empty SETTINGS frame and then nothing.
- bodies: per body format, 8 threads send the largest body of its worst shape that the server accepts (sizes from
  the `ready` log record's http_limits, else max_message_bytes) in a loop for --body-window-seconds; the attacker's
  answers (status, time), the victims' latency, and the server's RSS at idle, at most (sampled every 100 ms) and
  after. One fresh server per format: memory kept after one format would be the next one's baseline.
- trickle: 512 connections send a whole POST head with Content-Length: 1000000 and then a body byte every 2 s
  (reconnecting when closed): the victims' p99 and how many got 429 / 503 / other failures.
- drain: 16 clients, each on ONE keep-alive connection, POST infer every 50 ms (retrying 503s on the same
  connection); SIGTERM after 3 s; per client the calls answered 200, clean 503s and lost calls (reset, closed
  mid-call, or a request sent on a connection the server then closed unanswered); a refused reconnect means the
  server is gone, not a lost call. Also the server's `drained` record and exit status.

Each scenario prints one JSON line per result as it finishes (bodies: one per format), --json writes them all with
the configuration, and a compact table ends the run. The victims' gRPC channels reconnect with a short backoff
(100 ms .. 1 s) so a failure measured is the server's, not the client library's back-off after one.
"""
