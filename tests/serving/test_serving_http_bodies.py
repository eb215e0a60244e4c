"""Request bodies in-process (serving.http.bodies): limits per encoding derived from what a valid request holds,
counts that refuse an impossible body before it is parsed, the multipart parser, and compressed bodies inflated
no further than the limit.
Run: .venv/bin/python -m pytest tests/serving/test_serving_http_bodies.py -q"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from aiohttp import streams

from serving.core.errors import InvalidInput
from serving.http.bodies import BodyLimits, body_of, multipart_files, parse_json, receive
from serving.http.errors import HttpError

LIMITS = BodyLimits.derive(max_images=256, max_message_bytes=16 << 20, timeout=5.0)


def test_limits_follow_from_the_images_a_request_may_hold():
    # 256 images x 784 numbers, 16 bytes each at most (pretty-printed), plus room for names and shapes
    assert LIMITS.kserve_json_bytes == 256 * 784 * 16 + 64 * 1024
    assert LIMITS.kserve_json_bytes < LIMITS.body_bytes / 4  # far below the binary message limit
    compact = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [256, 1, 28, 28],
                                      "data": [[[[255] * 28] * 28]] * 256}]}).encode()
    pretty = json.dumps(json.loads(compact), indent=1).encode()
    assert len(compact) < len(pretty) < LIMITS.kserve_json_bytes  # the largest valid batch fits, even pretty
    assert LIMITS.typed_json_bytes > LIMITS.body_bytes * 4 // 3  # the base64 of the largest binary message fits
    small = BodyLimits.derive(max_images=4, max_message_bytes=1 << 20, timeout=1.0)
    assert small.kserve_json_bytes == 4 * 784 * 16 + 64 * 1024


@pytest.mark.parametrize("body, counts", [
    (b"[" + b"[]," * 100_000 + b"[]]", LIMITS.kserve_counts),  # many empty lists
    (b"[" + b"0," * 300_000 + b"0]", LIMITS.kserve_counts),  # more numbers than 256 images hold
    (b"[" + b"{}," * 10_000 + b"{}]", LIMITS.typed_counts),  # many empty images
])
def test_counts_refuse_impossible_json_before_parsing(body, counts):
    with pytest.raises(HttpError) as refused:
        parse_json(body, "the request", counts)
    assert refused.value.status == 413 and refused.value.headers == {"Connection": "close"}


def test_an_impossible_json_body_is_refused_as_it_arrives():
    async def run():
        first = b'{"images": [' + b"{}," * 2_000  # the rest never comes: refused on what has arrived
        request = _request(first, {"Content-Type": "application/json", "Content-Length": str(10 * len(first))},
                           "/v1/classify", complete=False)
        with pytest.raises(HttpError) as refused:
            await receive(request, LIMITS)
        return refused.value

    refused = asyncio.run(run())
    assert refused.status == 413 and "objects" in str(refused)


def test_deep_nesting_is_a_400_not_a_crash():
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_json(b"[" * 100_000 + b"]" * 100_000, "the inference request")
    assert parse_json(b'{"a": [[1, 2], [3]]}', "x", {b"[": 3, b",": 2}) == {"a": [[1, 2], [3]]}


def _multipart(parts: list[tuple[dict[str, str], bytes]], boundary: str = "b0undary") -> tuple[str, bytes]:
    body = b""
    for headers, data in parts:
        body += f"--{boundary}\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        body += b"\r\n" + data + b"\r\n"
    return f'multipart/form-data; boundary="{boundary}"', b"preamble\r\n" + body + f"--{boundary}--\r\n".encode()


def test_multipart_files_in_order_fields_skipped():
    png, jpeg = b"\x89PNG\r\n\x1a\nfake\r\n--not-the-boundary", b"\xff\xd8\xff" + bytes(range(256))
    content_type, body = _multipart([
        ({"Content-Disposition": 'form-data; name="file"; filename="a.png"', "Content-Type": "image/png"}, png),
        ({"Content-Disposition": 'form-data; name="note"'}, b"a plain field"),
        ({"Content-Disposition": 'form-data; name="file"; filename="b.jpg"', "Content-Type": "image/jpeg",
          "Content-Transfer-Encoding": "base64"}, base64.b64encode(jpeg)),
        ({"Content-Disposition": 'form-data; name="blob"', "Content-Type": "application/octet-stream"}, b""),
    ])
    assert multipart_files(content_type, body, max_parts=8) == [("image/png", png), ("image/jpeg", jpeg),
                                                                ("application/octet-stream", b"")]


@pytest.mark.parametrize("content_type, body, error, status", [
    ("multipart/form-data", b"--x\r\n\r\n--x--", InvalidInput, None),  # no boundary
    ("multipart/form-data; boundary=\u00e9t\u00e9", b"--\xc3\xa9t\xc3\xa9\r\n\r\nx\r\n--\xc3\xa9t\xc3\xa9--",
     InvalidInput, None),  # not ASCII
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Type: image/png\r\n\r\ntruncated", InvalidInput, None),
    ("multipart/form-data; boundary=zz", b"no boundary at all", InvalidInput, None),
    ("multipart/form-data; boundary=zz", b"--zz\r\nbroken header\r\n\r\nx\r\n--zz--", InvalidInput, None),
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--zz--",
     InvalidInput, None),  # only a plain field
    ("multipart/form-data; boundary=zz",
     b"".join(b"--zz\r\nContent-Type: image/png\r\n\r\nx\r\n" for _ in range(100_000)) + b"--zz--",
     HttpError, 413),  # 100,000 tiny parts: refused by a count, not split
])
def test_bad_multipart_bodies_are_refused(content_type, body, error, status):
    with pytest.raises(error) as refused:
        multipart_files(content_type, body, max_parts=256)
    if status:
        assert refused.value.status == status


def _request(body: bytes, headers: dict[str, str], path: str = "/v2/models/m/infer", complete: bool = True):
    """A request whose body has arrived (complete) or whose first bytes only have."""
    protocol = mock.Mock(_reading_paused=False)  # the little of aiohttp's protocol a StreamReader touches
    payload = streams.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    if complete:
        payload.feed_eof()
    return make_mocked_request("POST", path, headers={"Content-Length": str(len(body)), **headers},
                               payload=payload, protocol=protocol)


def test_a_gzip_bomb_is_inflated_no_further_than_the_limit():
    limits = BodyLimits.derive(max_images=4, max_message_bytes=1 << 20, timeout=5.0)
    bomb = gzip.compress(b" " * (256 << 20), 9)  # 256 MiB of spaces in ~250 KB
    inflated = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args):
            self._inner = real(*args)

        def decompress(self, data, max_length=0):
            out = self._inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._inner, name)

    async def run():
        request = _request(bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        with pytest.raises(HttpError) as refused:
            zlib.decompressobj = Counting
            try:
                await receive(request, limits)
            finally:
                zlib.decompressobj = real
        return refused.value

    refused = asyncio.run(run())
    assert refused.status == 413 and "once inflated" in str(refused)
    assert sum(inflated) <= limits.kserve_json_bytes + 2 * (1 << 20)  # stopped at the limit, one step past at most


@pytest.mark.parametrize("encoding, data, ok", [
    ("gzip", gzip.compress(b'{"inputs": []}'), True),
    ("deflate", zlib.compress(b'{"inputs": []}'), True),
    ("deflate", zlib.compress(b'{"inputs": []}')[2:-4], True),  # raw deflate, as some clients send it
    ("gzip", b"this is not gzip", False),
    ("gzip", gzip.compress(b'{"inputs": []}')[:-12], False),  # truncated
    ("br", b"\x0b\x02\x80", False),
])
def test_compressed_bodies(encoding, data, ok):
    async def run():
        request = _request(data, {"Content-Type": "application/json", "Content-Encoding": encoding})
        await receive(request, LIMITS)
        return body_of(request)

    if ok:
        assert asyncio.run(run()) == b'{"inputs": []}'
    else:
        with pytest.raises((InvalidInput, HttpError)) as refused:
            asyncio.run(run())
        assert getattr(refused.value, "status", 400) in (400, 415)


def test_a_declared_length_over_the_encodings_limit_is_refused_before_reading():
    async def run(headers: dict[str, str], size: int, declared: int):
        request = _request(b"x" * size, {**headers, "Content-Length": str(declared)})
        return len(await receive(request, LIMITS))

    big = LIMITS.kserve_json_bytes + 1
    with pytest.raises(HttpError) as refused:  # 10 bytes sent, but the declared length alone is refused
        asyncio.run(run({"Content-Type": "application/json"}, 10, big))
    assert refused.value.status == 413 and "--max-images-per-request" in str(refused.value)
    # the same size as binary tensor data is within the binary limit
    assert asyncio.run(run({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "2"},
                           big, big)) == big


def test_a_client_gone_mid_body_is_a_disconnect_not_a_server_error():
    """aiohttp says RuntimeError("Connection closed.") when a body is awaited on a closed connection (an evicted
    trickle, a client that hung up): that is the client's doing, ConnectionResetError, never a 500 and a traceback."""
    async def run():
        request = _request(b"abc", {"Content-Type": "image/png", "Content-Length": "1000"}, complete=False)
        request.protocol.connected = False
        await receive(request, LIMITS)

    with pytest.raises(ConnectionResetError):
        asyncio.run(run())



@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/octet-stream"])
def test_a_kserve_body_without_the_binary_header_is_counted_as_json_whatever_its_type(content_type):
    async def run():
        request = _request(b"[" + b"0," * 300_000 + b"0]", {"Content-Type": content_type})
        with pytest.raises(HttpError) as refused:
            await receive(request, LIMITS)
        return refused.value

    refused = asyncio.run(run())
    assert refused.status == 413
