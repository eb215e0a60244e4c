"""bench.abuse's pieces, in process and quick (no server, no attack run): the hostile bodies have the size asked for
and the structure their format says, the limits are read from the `ready` record, the latency summary, the HTTP
answer parser, the log digest, and the connection flood's selector loop against a local listener."""

import gzip
import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

from bench.abuse.bodies import (MULTIPART_PART, Body, body_limit, build_body, gzip_bomb, kserve_binary, kserve_json_deep,
                                kserve_json_nested, kserve_json_recursion, multipart_tiny_parts, raw_image,
                                typed_json_empty_images)
from bench.abuse.flood import Flood, parse_responses, split_kinds
from bench.abuse.server import log_digest, process_tree, tree_usage
from bench.abuse.victims import HttpStatus, failure_kind, summarize
from bench.abuse.wire import SLOWLORIS_HEAD

SIZE = 200_000


def _kserve(body: Body) -> dict:
    request = json.loads(body.body)
    tensor = request["inputs"][0]
    assert tensor["name"] == "image" and tensor["datatype"] == "UINT8" and tensor["shape"][1:] == [1, 28, 28]
    return tensor


def _depth(value) -> int:
    depth = 0
    while isinstance(value, list):
        value, depth = value[0], depth + 1
    return depth


def test_kserve_json_bodies_fill_the_size_and_agree_with_their_shape():
    nested = kserve_json_nested(SIZE, "m")
    deep = kserve_json_deep(SIZE, "m", depth=28)
    for body in (nested, deep):
        assert len(body.body) == SIZE and body.path == "/v2/models/m/infer"
        tensor = _kserve(body)
        assert len(tensor["data"]) == tensor["shape"][0] * 784 > 0  # one number per item
        assert SIZE - len(json.dumps(tensor["data"], separators=(",", ":"))) < 784 * 60 + 200  # mostly data
    assert _depth(_kserve(nested)["data"]) == 3 and _depth(_kserve(deep)["data"]) == 29


def test_recursion_body_is_one_nesting_as_deep_as_the_size():
    body = kserve_json_recursion(SIZE, "m")
    assert len(body.body) == SIZE and body.body.count(b"[") > SIZE // 2 - 100
    with pytest.raises(RecursionError):
        json.loads(body.body)


def test_binary_body_has_a_header_and_the_largest_whole_image_tail():
    body = kserve_binary(SIZE, "m")
    assert len(body.body) == SIZE
    length = int(body.headers["Inference-Header-Content-Length"])
    tensor = _kserve(Body("", {}, body.body[:length]))
    tail = body.body[length:]
    assert tensor["parameters"]["binary_data_size"] == len(tail) == tensor["shape"][0] * 784
    assert SIZE - len(tail) < 784 + 200


def test_typed_raw_and_multipart_bodies():
    typed = typed_json_empty_images(SIZE, "m")
    assert len(typed.body) == SIZE and typed.path == "/v1/classify"
    images = json.loads(typed.body)["images"]
    assert len(images) > SIZE // 3 - 10 and all(image == {} for image in images)

    raw = raw_image(SIZE, "m")
    assert len(raw.body) == SIZE and raw.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(raw.body)).size == (28, 28)

    import email.parser
    import email.policy

    for max_parts, size in ((None, 20_000), (5, 20_000)):
        multi = multipart_tiny_parts(size, "m", max_parts)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + multi.headers["Content-Type"].encode() + b"\r\n\r\n" + multi.body)
        parts = list(message.iter_parts())
        assert all(p.get_filename() == "a" and p.get_payload(decode=True) == b"X" for p in parts)
        if max_parts is None:
            assert size - len(multi.body) < len(MULTIPART_PART) and len(parts) > 100
        else:
            assert len(parts) == max_parts


def test_gzip_body_inflates_to_valid_json_of_the_size_asked():
    body = gzip_bomb("m", 2_000_000)
    assert body.headers["Content-Encoding"] == "gzip" and len(body.body) < 20_000
    inflated = gzip.decompress(body.body)
    assert len(inflated) == 2_000_000 and len(_kserve(Body("", {}, inflated))["data"]) == 784


def test_body_limits_come_from_the_ready_record():
    ready = {"max_message_bytes": 1000, "http_limits": {"body_bytes": 900, "json_bytes": 500,
                                                        "typed_json_bytes": 1300, "multipart_parts": 7}}
    assert body_limit("kserve-json-nested", ready) == 500
    assert body_limit("typed-json-empty-images", ready) == 1300
    assert body_limit("raw-image", ready) == 900
    assert body_limit("typed-json-empty-images", {"max_message_bytes": 1000}) == 1000  # an older server
    assert body_limit("gzip", {}) == 16 * 1024 * 1024
    multi = build_body("multipart-tiny-parts", {**ready, "model": "m"}, None)
    assert multi.note == "7 parts"


def test_summarize_and_failure_kinds():
    assert summarize([i / 1000 for i in range(100, 0, -1)]) == {"p50_ms": 50.0, "p99_ms": 99.0,
                                                                       "max_ms": 100.0}
    assert summarize([0.002]) == {"p50_ms": 2.0, "p99_ms": 2.0, "max_ms": 2.0}
    assert summarize([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None}
    assert failure_kind(HttpStatus(429, "busy")) == "http 429"
    assert failure_kind(socket.timeout()) == "timeout"
    assert failure_kind(ConnectionResetError()) == "ConnectionResetError"


def test_parse_responses_takes_complete_answers_only():
    buffer = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 408 Request Timeout\r\n"
                       b"Content-Length: 0\r\n\r\nHTTP/1.1 503 Service")
    assert parse_responses(buffer) == ["200", "408"] and buffer == bytearray(b"HTTP/1.1 503 Service")
    assert parse_responses(bytearray(b"\x00\x00\x00\x04")) == ["garbage"]
    assert parse_responses(bytearray(b"HTT")) == []  # the start of an answer: wait for more


def test_log_digest_counts_kinds_and_bytes():
    lines = [json.dumps({"level": "warning", "logger": "asyncio", "event": "accept failed", "n": i}) for i in range(3)]
    lines += ["E1207 12:00:01 tcp_server_posix.cc:100] accept: Too many open files",
              "E1207 12:00:02 tcp_server_posix.cc:100] accept: Too many open files"]
    digest = log_digest(lines)
    assert digest["lines"] == 5 and digest["bytes"] == sum(len(line) + 1 for line in lines)
    assert [k["count"] for k in digest["first"]] == [3, 2] and digest["kinds"] == 2


def test_process_usage_and_kind_split():
    rss, threads = tree_usage(os.getpid())
    assert rss > 0 and threads >= 1 and process_tree(os.getpid())[0] == os.getpid()
    assert split_kinds(7, ("a", "b", "c")) == ["a", "b", "c", "a", "b", "c", "a"]


def test_flood_opens_drips_and_sees_the_server_close():
    """A listener that answers a GET and keeps every connection until the test says close: all open, the
    slowloris ones drip, the keep-alives get their answer, and each is seen closed by the server once it is."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: dict[int, bytes] = {}
    answered = threading.Semaphore(0)
    close_now = threading.Event()
    changed = threading.Condition()

    def handle(position: int, conn: socket.socket) -> None:
        data = b""
        conn.settimeout(0.05)  # how often to look at close_now, not a guess of how long anything takes
        while not close_now.is_set():
            try:
                chunk = conn.recv(1024)
            except socket.timeout:
                continue
            if not chunk:
                break
            data += chunk
            if data.startswith(b"GET") and data.endswith(b"\r\n\r\n"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                answered.release()
            with changed:
                received[position] = data
                changed.notify_all()
        conn.close()

    def serve() -> None:
        for position in range(9):
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(position, conn), daemon=True).start()

    def dripped() -> bool:
        return any(d.startswith(SLOWLORIS_HEAD + b"X-S") for d in received.values())

    threading.Thread(target=serve, daemon=True).start()
    flood = Flood(port, split_kinds(9, ("silent", "slowloris", "keepalive")), interval=0.02)
    flood.start()
    try:
        assert flood.ready.wait(60)
        for _ in range(3):
            assert answered.acquire(timeout=60)  # every keep-alive got its answer
        with changed:
            assert changed.wait_for(dripped, timeout=60)  # the head, then dripped bytes
        close_now.set()  # now the "server" closes them all
        give_up = time.monotonic() + 60  # only if the flood never notices: not a guess of how long it takes
        while any(c.state != "closed" for c in flood.conns):
            assert time.monotonic() < give_up, [c.state for c in flood.conns]
            time.sleep(0.01)  # the flood thread updates the states; this polls them
    finally:
        close_now.set()
        flood.stop()
        listener.close()
    stats = flood.stats()
    for kind in ("silent", "slowloris", "keepalive"):
        assert stats[kind]["opened"] == 3 and stats[kind]["closed_by_server"] == 3 and stats[kind]["still_open"] == 0
        assert isinstance(stats[kind]["close_s_max"], float) and stats[kind]["close_s_max"] > 0
    assert stats["keepalive"]["received"] == {"200": 3}
