"""Hostile request bodies, each the largest of its format the server accepts in its worst shape, and the threads that send them."""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import threading
import time
import zlib
from dataclasses import dataclass

from bench.abuse.flood import parse_responses
from bench.abuse.wire import HOST, IMAGE_SHAPE, PIXELS, digit_png

BODY_FORMATS = ("kserve-json-nested", "kserve-json-deep", "kserve-json-recursion", "kserve-json-valid",
                "kserve-binary", "typed-json-empty-images", "typed-json-valid", "raw-image", "multipart-tiny-parts",
                "gzip")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024



# ------------------------------------------------------------------------------------------ hostile bodies


@dataclass
class Body:
    path: str
    headers: dict
    body: bytes
    note: str = ""


def _kserve_json(size: int, model: str, item: bytes) -> Body:
    """A KServe infer JSON body of exactly `size` bytes whose input data is `item` repeated (comma-separated),
    as many as fit while the element count stays a whole number of images (the shape then agrees with the data:
    the server parses and flattens it all before any count check), padded with JSON whitespace."""
    def frame(images: int) -> tuple[bytes, bytes]:
        head = (b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[' + str(images).encode()
                + b',1,28,28],"data":[')
        return head, b"]}]}"
    head, tail = frame(10 ** 9)  # the longest frame: the count fits whatever it becomes
    items = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    items -= items % PIXELS  # one number per item
    if items <= 0:
        raise ValueError(f"{size} bytes are too few for one image of {item[:20]!r}")
    head, tail = frame(items // PIXELS)
    body = head + b",".join([item] * items) + tail
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"{items} items of {len(item)} B")


def kserve_json_nested(size: int, model: str) -> Body:
    """A huge list of small nested lists of numbers: `[[0]],[[0]],...` (two list objects per number)."""
    return _kserve_json(size, model, b"[[0]]")


def kserve_json_deep(size: int, model: str, depth: int = 28) -> Body:
    """Spines `[[[...[0]...]]]` `depth` deep, repeated: the densest list objects per byte that still parse."""
    return _kserve_json(size, model, b"[" * depth + b"0" + b"]" * depth)


def kserve_json_recursion(size: int, model: str) -> Body:
    """One `[[[[...]]]]` as deep as fills the body (millions of levels): past any recursion limit."""
    head = b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,28,28],"data":'
    tail = b"}]}"
    depth = (size - len(head) - len(tail)) // 2
    body = head + b"[" * depth + b"]" * depth + tail
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"depth {depth}")


def kserve_json_valid(model: str, images: int) -> Body:
    """The largest valid KServe JSON request: `images` (--max-images-per-request) 28x28 images of 255s as nested
    [N,1,28,28] lists, pretty-printed (one number a line): every byte of it is parsed, and it is answered 200."""
    data = [[[[255] * 28] * 28]] * images
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [images, *IMAGE_SHAPE],
                                   "data": data}]}, indent=1).encode()
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json"}, body, f"{images} images")


def typed_json_valid(model: str, images: int) -> Body:
    """The largest valid typed-API JSON request of real images: `images` 240x240 noisy PNGs (~58 KB each, 15 MB in all), base64."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 240), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    body = json.dumps({"images": [{"encoded": base64.b64encode(png).decode()}] * images}).encode()
    return Body("/v1/classify", {"Content-Type": "application/json"}, body, f"{images} PNGs of {len(png)} B")


def kserve_binary(size: int, model: str) -> Body:
    """Triton's binary extension: a JSON header, then the largest raw UINT8 tail of whole images that fits."""
    def header(images: int) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [images, *IMAGE_SHAPE],
                                       "parameters": {"binary_data_size": images * PIXELS}}]},
                          separators=(",", ":")).encode()
    images = (size - len(header(10 ** 9))) // PIXELS
    head = header(images)
    head += b" " * (size - len(head) - images * PIXELS)  # whitespace after the JSON: the body is exactly `size`
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": str(len(head))},
                head + bytes(images * PIXELS), f"{images} images")


def typed_json_empty_images(size: int, model: str) -> Body:
    """POST /v1/classify {"images": [{}, {}, ...]}: a message object per 3 bytes."""
    head, tail = b'{"images":[', b"]}"
    count = (size - len(head) - len(tail) + 1) // 3
    body = head + b",".join([b"{}"] * count) + tail
    return Body("/v1/classify", {"Content-Type": "application/json"},
                body[:-len(tail)] + b" " * (size - len(body)) + tail, f"{count} images")


def raw_image(size: int, model: str) -> Body:
    """POST /v1/classify image/png: a real 28x28 PNG followed by random bytes up to `size` (decoders stop at IEND)."""
    png = digit_png()
    return Body("/v1/classify", {"Content-Type": "image/png"}, png + random.randbytes(size - len(png)),
                f"{len(png)} B PNG + padding")


MULTIPART_BOUNDARY = b"b"
MULTIPART_PART = (b"--" + MULTIPART_BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="a"'
                  b"\r\n\r\nX\r\n")


def multipart_tiny_parts(size: int, model: str, max_parts: int | None = None) -> Body:
    """multipart/form-data with as many 1-byte file parts as fit (and the server allows, when it says)."""
    closing = b"--" + MULTIPART_BOUNDARY + b"--\r\n"
    parts = (size - len(closing)) // len(MULTIPART_PART)
    if max_parts is not None:
        parts = min(parts, max_parts)
    return Body("/v1/classify", {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY.decode()}"},
                MULTIPART_PART * parts + closing, f"{parts} parts")


def gzip_bomb(model: str, inflated: int) -> Body:
    """A KServe infer JSON sent with Content-Encoding: gzip whose inflated size is `inflated` bytes (whitespace
    before the data: valid JSON once inflated), compressed ~1000:1."""
    head = b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,28,28],"data":'
    tail = b"[" + b",".join([b"0"] * PIXELS) + b"]}]}"
    spaces = inflated - len(head) - len(tail)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # the gzip wrapper
    out = [packer.compress(head)]
    chunk = b" " * (1 << 20)
    for _ in range(spaces // len(chunk)):
        out.append(packer.compress(chunk))
    out.append(packer.compress(b" " * (spaces % len(chunk)) + tail))
    out.append(packer.flush())
    body = b"".join(out)
    return Body(f"/v2/models/{model}/infer", {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                body, f"inflates to {inflated} B")


LIMIT_KEYS = {  # which of the ready record's http_limits bounds each format's body, first present wins
    "kserve-json-nested": ("json_bytes", "body_bytes"), "kserve-json-deep": ("json_bytes", "body_bytes"),
    "kserve-json-recursion": ("json_bytes", "body_bytes"), "kserve-binary": ("body_bytes",),
    "kserve-json-valid": ("json_bytes", "body_bytes"), "typed-json-valid": ("typed_json_bytes", "body_bytes"),
    "typed-json-empty-images": ("typed_json_bytes", "body_bytes"), "raw-image": ("body_bytes",),
    "multipart-tiny-parts": ("body_bytes",), "gzip": ("body_bytes",)}


def body_limit(fmt: str, ready: dict) -> int:
    """The largest body of this format the server says it accepts: its http_limits entry, else max_message_bytes."""
    limits = ready.get("http_limits") or {}
    for key in LIMIT_KEYS[fmt]:
        if limits.get(key):
            return int(limits[key])
    return int(ready.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES)


def build_body(fmt: str, ready: dict, opts: argparse.Namespace) -> Body:
    size, model = body_limit(fmt, ready), ready["model"]
    if fmt == "kserve-json-deep":
        return kserve_json_deep(size, model, opts.deep_depth)
    if fmt == "multipart-tiny-parts":
        return multipart_tiny_parts(size, model, (ready.get("http_limits") or {}).get("multipart_parts"))
    if fmt == "gzip":
        return gzip_bomb(model, opts.gzip_inflated_bytes)
    if fmt in ("kserve-json-valid", "typed-json-valid"):
        images = int(ready.get("max_images_per_request") or 256)
        return (kserve_json_valid if fmt == "kserve-json-valid" else typed_json_valid)(model, images)
    return {"kserve-json-nested": kserve_json_nested, "kserve-json-recursion": kserve_json_recursion,
            "kserve-binary": kserve_binary, "typed-json-empty-images": typed_json_empty_images,
            "raw-image": raw_image}[fmt](size, model)


def exchange(port: int, body: Body, timeout: float) -> str:
    """Send one request on a fresh connection and read the answer's status; a send the server cuts short (it
    answered early and closed) still reads the answer. → "413", "timeout", "reset", "closed" (no answer)."""
    head = (f"POST {body.path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body.body)}\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in body.headers.items()) + "\r\n").encode()
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        return f"connect {type(exc).__name__}"
    try:
        try:
            sock.sendall(head)
            sock.sendall(body.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # maybe answered early: read it
        buffer = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return "timeout"
            except OSError:
                return "reset"
            if not data:
                return "closed"
            buffer += data
            statuses = parse_responses(buffer)
            if statuses:
                return statuses[0]
    finally:
        sock.close()


class Sender(threading.Thread):
    """Sends `body` in a loop until stopped: each answer's status and time."""

    def __init__(self, port: int, body: Body, timeout: float) -> None:
        super().__init__(daemon=True, name="attacker")
        self.port, self.body, self.timeout = port, body, timeout
        self.stopped = threading.Event()
        self.answers: list[tuple[str, float]] = []
        self.busy_since: float | None = None

    def run(self) -> None:
        while not self.stopped.is_set():
            self.busy_since = time.monotonic()
            status = exchange(self.port, self.body, self.timeout)
            self.answers.append((status, time.monotonic() - self.busy_since))
            self.busy_since = None


