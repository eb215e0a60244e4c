"""The Prometheus endpoint (serving.metrics_endpoint.MetricsServer) in-process: what a scrape answers, and that no client
can stall it (silent TLS sockets, many idle connections, slow request heads), with small limits so each test
takes milliseconds. Certificates come from the openssl command line tool, as in test_serving_security.py.

Time checks never bound how fast something is: a scrape must answer within a generous client timeout while
stallers are held open for longer than that timeout (a server that waited on them would not answer at all).
"""

from __future__ import annotations

import http.client
import select
import shutil
import socket
import ssl
import subprocess
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from serving.core.errors import StartupError
from serving.metrics import ModelStats
from serving.metrics_endpoint import MetricsServer

TOKEN = "metrics-t0ken"
CLIENT_TIMEOUT = 10.0  # what a scrape may take at most on a loaded machine
STALL = 60.0  # the server-side timeouts while stallers are held: far longer than CLIENT_TIMEOUT


@pytest.fixture
def stats() -> list[ModelStats]:
    first, second = ModelStats("lsoftmax_mnist_onnx", "1"), ModelStats("lsoftmax_mnist_torchscript", "1")
    for _ in range(3):
        first.record_request(None, 2_000_000)
    first.record_request("REJECTED", 1_000)
    first.record_execution(images=8, queue_ns=5_000, requests=3, compute_ns=1_000_000)
    second.record_request(None, 1_000_000)
    return [first, second]


def _self_signed(tmp: Path, name: str) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=metrics test {name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   cwd=tmp, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> SimpleNamespace:
    """Self-signed server and client certificates (each its own trust anchor)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line tool")
    tmp = tmp_path_factory.mktemp("metrics_pki")
    _self_signed(tmp, "server")
    _self_signed(tmp, "client")
    return SimpleNamespace(server_pem=str(tmp / "server.pem"), server_key=str(tmp / "server.key"),
                           client_pem=str(tmp / "client.pem"), client_key=str(tmp / "client.key"))


@contextmanager
def endpoint(stats, **options):
    server = MetricsServer.start(stats, "127.0.0.1", 0, **options)
    try:
        yield server
    finally:
        server.close()


def _tls_endpoint(stats, certs, **options):
    return endpoint(stats, certfile=certs.server_pem, keyfile=certs.server_key, **options)


def _client_context(certs, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.server_pem)
    if client_cert:
        context.load_cert_chain(certs.client_pem, certs.client_key)
    return context


def request(port: int, path: str = "/metrics", method: str = "GET", headers: dict | None = None,
            context: ssl.SSLContext | None = None, connection=None):
    """One request (on `connection` when given) → (status, headers, body)."""
    conn = connection or (http.client.HTTPSConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT, context=context)
                          if context else http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT))
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.headers, reply.read()
    finally:
        if connection is None:
            conn.close()


def samples(body: bytes) -> dict[tuple, float]:
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _raw_request(sock: socket.socket, data: bytes) -> bytes:
    """Send data, read until the peer closes (or CLIENT_TIMEOUT)."""
    sock.settimeout(CLIENT_TIMEOUT)
    sock.sendall(data)
    out = b""
    with suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _closed_by_peer(sock: socket.socket, timeout: float = CLIENT_TIMEOUT) -> bool:
    """True once the server has closed this silent connection (EOF or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def _still_open(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def _threads() -> int:
    """Threads of this process, Python's or not."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def test_a_scrape_has_tritons_names_and_keep_alive_works(stats):
    with endpoint(stats) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
        try:
            status, headers, body = request(server.port, connection=conn)
            assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_LATEST
            got = samples(body)
            onnx = (("model", "lsoftmax_mnist_onnx"), ("version", "1"))
            assert got[("nv_inference_request_success", *onnx)] == 3
            assert got[("nv_inference_request_success", ("model", "lsoftmax_mnist_torchscript"), ("version", "1"))] == 1
            assert got[("nv_inference_request_failure", *onnx[:1], ("reason", "REJECTED"), onnx[1])] == 1
            assert got[("nv_inference_count", *onnx)] == 8 and got[("nv_inference_exec_count", *onnx)] == 1
            stats[0].record_request(None, 1_000)
            status, _, body = request(server.port, path="/", connection=conn)  # same connection, fresh counts
            assert status == 200 and samples(body)[("nv_inference_request_success", *onnx)] == 4
        finally:
            conn.close()


def test_other_paths_methods_bad_heads_and_tokens_are_refused(stats):
    auth = lambda header: header == f"Bearer {TOKEN}"  # noqa: E731
    with endpoint(stats, auth=auth, max_head_bytes=1024) as server:
        assert request(server.port, "/other")[0] == 404
        status, headers, _ = request(server.port, method="POST")
        assert status == 405 and "GET" in headers["Allow"]
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, reply_headers, _ = request(server.port, headers=headers)
            assert status == 401 and reply_headers["WWW-Authenticate"] == "Bearer"
        status, _, body = request(server.port, "/metrics?x=1", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"nv_inference_request_success" in body
        with socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT) as sock:
            assert _raw_request(sock, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT) as sock:
            reply = _raw_request(sock, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 431 ") or reply == b""  # the reply may be lost to a reset


def test_a_busy_port_is_a_startup_error_and_ipv6_hosts_work(stats):
    with endpoint(stats) as server:
        with pytest.raises(StartupError, match="cannot bind the metrics endpoint to 127.0.0.1"):
            MetricsServer.start(stats, "127.0.0.1", server.port)
    if not socket.has_ipv6:
        return
    try:
        server = MetricsServer.start(stats, "[::1]", 0)
    except StartupError:
        return  # no IPv6 loopback here
    try:
        conn = http.client.HTTPConnection("::1", server.port, timeout=CLIENT_TIMEOUT)
        assert request(server.port, connection=conn)[0] == 200
        conn.close()
    finally:
        server.close()
    assert not server._thread.is_alive()


def test_tls_scrape_answers_while_silent_sockets_hold_no_handshake(stats, certs):
    with _tls_endpoint(stats, certs, handshake_timeout=STALL, header_timeout=STALL, idle_timeout=STALL) as server:
        stallers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        stallers[1].sendall(b"\x16\x03\x01")  # the start of a ClientHello, never finished
        try:
            status, _, body = request(server.port, context=_client_context(certs))
            assert status == 200 and b"nv_inference_request_success" in body
            assert all(_still_open(sock) for sock in stallers)  # held for the whole check
        finally:
            for sock in stallers:
                sock.close()
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            request(server.port)  # plain HTTP on the TLS port


def test_mutual_tls_requires_a_client_certificate(stats, certs):
    with _tls_endpoint(stats, certs, client_cafile=certs.client_pem) as server:
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            request(server.port, context=_client_context(certs))
        assert request(server.port, context=_client_context(certs, client_cert=True))[0] == 200


def test_many_idle_connections_neither_stall_a_scrape_nor_add_threads(stats):
    with endpoint(stats, header_timeout=STALL, idle_timeout=STALL, max_connections=512) as server:
        assert request(server.port)[0] == 200
        threads = _threads()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        try:
            status, _, body = request(server.port)
            assert status == 200 and b"nv_inference_request_success" in body
            assert _threads() <= threads
            assert all(_still_open(sock) for sock in idle)
        finally:
            for sock in idle:
                sock.close()


def test_idle_connections_and_unfinished_handshakes_are_closed_after_their_timeouts(stats, certs):
    with endpoint(stats, header_timeout=0.2, idle_timeout=0.2) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert _closed_by_peer(silent)  # a new connection that never sends a request
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head never finished
            assert _closed_by_peer(slow)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
        try:
            assert request(server.port, connection=conn)[0] == 200
            assert _closed_by_peer(conn.sock)  # keep-alive, then idle
        finally:
            conn.close()
    with _tls_endpoint(stats, certs, handshake_timeout=0.2) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert _closed_by_peer(silent)


def test_connections_beyond_the_cap_are_closed_and_a_scrape_still_gets_in(stats):
    cap = 4
    with endpoint(stats, header_timeout=STALL, idle_timeout=STALL, max_connections=cap) as server:
        idle = []
        for _ in range(10):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        try:
            # the longest-waiting ones make room: the 6 oldest are closed, the newest `cap` stay
            assert all(_closed_by_peer(sock) for sock in idle[:-cap])
            assert all(_still_open(sock) for sock in idle[-cap:])
            assert request(server.port)[0] == 200  # evicts one more idle connection, not the scrape
            assert _closed_by_peer(idle[-cap])
        finally:
            for sock in idle:
                sock.close()


def test_close_stops_the_thread_and_frees_the_port(stats):
    server = MetricsServer.start(stats, "127.0.0.1", 0)
    lingering = socket.create_connection(("127.0.0.1", server.port))
    server.close()
    assert not server._thread.is_alive()
    assert _closed_by_peer(lingering)
    lingering.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT).close()
    server.close()  # twice is fine
