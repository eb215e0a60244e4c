"""Request bodies within limits that follow from what a valid request can hold, read and parsed without holding the
event loop.

    limits = BodyLimits.derive(max_images=256, max_message_bytes=16 << 20, timeout=30.0)
    await receive(request, limits)     # the middleware, before the request takes a concurrency slot
    body = body_of(request)            # the handlers; a JSON body has been counted as it arrived, so
    parsed = await off_loop(lambda: parse_json(body, "the request"), len(body))   # it is only parsed here

Why each limit: --max-message-bytes bounds a request's images as bytes (raw, binary tensor data, one encoded
image, multipart uploads); but a JSON body costs far more to parse than its bytes to read, and a valid one holds
at most --max-images-per-request images: KServe JSON at most 784 numbers per image (JSON_BYTES_PER_VALUE bytes each
leaves room for pretty-printing), the typed API's JSON the base64 of at most --max-message-bytes. A body beyond
its encoding's limit is refused (413) from Content-Length before it is read, or as soon as it grows past it; then
cheap counts over the bytes refuse (413) what cannot be valid before any parser runs: more values, lists or
objects than that many images need, more multipart parts than images. Parsing runs in a worker thread once a body
is over INLINE_PARSE_BYTES, in steps short enough that other clients' calls go on meanwhile (orjson, a few ms
per MB). Compressed bodies (Content-Encoding gzip or deflate) are inflated here, step by step, and never past the
limit: the answer is decided before anything more is inflated, and the connection is closed instead of read to
the end. A body that trickles in slower than --http-body-timeout allows gets 408.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import zlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import orjson
from aiohttp import web

from serving.core.errors import InvalidInput
from serving.http.errors import HttpError

__all__ = ["BodyLimits", "receive", "body_of", "parse_json", "off_loop", "multipart_files", "CLOSE"]

CLOSE = {"Connection": "close"}  # a refusal after which the rest of the body is not read
PIXELS_PER_IMAGE = 784
JSON_BYTES_PER_VALUE = 16  # "255," is 4; pretty-printed, one per line with indentation, up to ~16
JSON_SLACK_BYTES = 64 * 1024  # names, shapes, parameters, outputs
INLINE_PARSE_BYTES = 64 * 1024  # smaller bodies are parsed on the loop: the thread hand-off costs more
INFLATE_STEP_BYTES = 1 << 20  # inflate at most this much before letting the loop run others
_BODY_KEY = web.RequestKey("lsoftmax.body", bytes)

T = TypeVar("T")


@dataclass(frozen=True)
class BodyLimits:
    body_bytes: int  # --max-message-bytes: raw images, binary tensors, multipart, after decompression
    kserve_json_bytes: int  # the JSON of a KServe request (its header, with the binary extension)
    typed_json_bytes: int  # the typed API's JSON: base64 grows bytes by 4/3
    max_images: int
    timeout: float  # --http-body-timeout

    @classmethod
    def derive(cls, max_images: int, max_message_bytes: int, timeout: float) -> "BodyLimits":
        kserve = min(max_images * PIXELS_PER_IMAGE * JSON_BYTES_PER_VALUE + JSON_SLACK_BYTES,
                     max_message_bytes + JSON_SLACK_BYTES)
        return cls(body_bytes=max_message_bytes, kserve_json_bytes=kserve,
                   typed_json_bytes=max_message_bytes * 4 // 3 + JSON_SLACK_BYTES, max_images=max_images,
                   timeout=timeout)

    @property
    def max_json_values(self) -> int:
        return self.max_images * PIXELS_PER_IMAGE

    @property
    def kserve_counts(self) -> dict[bytes, int]:
        """The most objects, lists and commas the JSON of a valid KServe request holds: [N,1,28,28] nests 30 lists
        per image, and a few objects name inputs, outputs and parameters."""
        lists = self.max_images * 32 + 64
        return {b"{": 1024, b"[": lists, b",": self.max_json_values + lists + 1024}

    @property
    def typed_counts(self) -> dict[bytes, int]:
        """The most objects the JSON of a valid typed request holds: one per image, and the request's own."""
        return {b"{": 2 * self.max_images + 16}

    def as_fields(self) -> dict[str, int]:
        """What the `ready` log line reports (and what a client may send at most)."""
        return {"body_bytes": self.body_bytes, "json_bytes": self.kserve_json_bytes,
                "typed_json_bytes": self.typed_json_bytes, "multipart_parts": self.max_images}

    def for_request(self, request: web.Request) -> tuple[int, str, dict[bytes, int]]:
        """The most this request's body may be, what sets it (for the 413's message), and for a JSON body the
        counts it may not exceed (checked as it arrives). A KServe body without the binary extension's header is
        JSON whatever its Content-Type says; a typed one is JSON when it says so (else an image or multipart)."""
        if request.path.startswith("/v1/"):
            if request.content_type == "application/json":
                return self.typed_json_bytes, "base64 of --max-message-bytes", self.typed_counts
            return self.body_bytes, "--max-message-bytes", {}
        if "Inference-Header-Content-Length" in request.headers:  # counted once split from its binary tail
            return self.kserve_json_bytes + self.body_bytes, "the JSON header and --max-message-bytes", {}
        return self.kserve_json_bytes, (f"the JSON of --max-images-per-request={self.max_images} images; send "
                                        "larger batches as binary tensor data"), self.kserve_counts


def _too_large(size: int | None, limit: int, why: str) -> HttpError:
    what = f"of {size} bytes " if size is not None else ""
    return HttpError(413, f"the request body {what}is larger than the {limit} bytes this server accepts for it "
                          f"({why})", CLOSE)


class _Inflater:
    """gzip or deflate, inflated INFLATE_STEP_BYTES at a time so that the reader can stop at its limit."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS)
        self._first = encoding == "deflate"

    def pieces(self, data: bytes):
        """What `data` inflates to, in steps."""
        if self._first and data:  # "deflate" means zlib-wrapped, but some clients send it raw
            self._first = False
            if len(data) < 2 or (data[0] & 0x0F) != 8 or (data[0] << 8 | data[1]) % 31:
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        while data:
            try:
                yield self._inflate.decompress(data, INFLATE_STEP_BYTES)
            except zlib.error as exc:
                raise InvalidInput(f"the request body is not valid {self.encoding} data ({exc})") from None
            data = self._inflate.unconsumed_tail

    def check_complete(self) -> None:
        if not self._inflate.eof:
            raise InvalidInput(f"the request body's {self.encoding} data is truncated")


def _inflater(request: web.Request) -> _Inflater | None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Inflater(encoding)
    raise HttpError(415, f"Content-Encoding {encoding!r} is not supported: send identity, gzip or deflate", CLOSE)


async def receive(request: web.Request, limits: BodyLimits) -> bytes:
    """Read the whole body within its limit and time, inflating it if compressed; kept for `body_of(request)`."""
    limit, why, counts = limits.for_request(request)
    inflater = _inflater(request)
    if inflater is None and request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit, why)

    async def read() -> bytes:
        chunks, total, seen = [], 0, dict.fromkeys(counts, 0)
        try:
            async for chunk in request.content.iter_any():
                for piece in (chunk,) if inflater is None else inflater.pieces(chunk):
                    total += len(piece)
                    if total > limit:
                        raise _too_large(None, limit, why + (", once inflated" if inflater else ""))
                    for char, most in counts.items():  # an impossible JSON body is refused before the rest arrives
                        seen[char] += piece.count(char)
                        if seen[char] > most:
                            raise _too_many(char, most, "the request")
                    chunks.append(piece)
                    if inflater is not None:
                        await asyncio.sleep(0)  # one step at a time: other clients' calls go on
            if inflater is not None:
                inflater.check_complete()
            return b"".join(chunks)
        except BaseException:
            # the refusal's traceback keeps this frame alive until the cyclic GC runs: not the body with it
            chunks.clear()
            chunk = piece = None
            raise

    try:
        body = await asyncio.wait_for(read(), limits.timeout)
    except RuntimeError:
        if request.protocol is None or not request.protocol.connected:  # aiohttp's word for "the client is gone"
            raise ConnectionResetError("the client closed the connection before its body arrived") from None
        raise
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {limits.timeout:g} s (--http-body-timeout)",
                        CLOSE) from None
    request[_BODY_KEY] = body
    return body


def body_of(request: web.Request) -> bytes:
    """The body `receive` read for this request."""
    return request.get(_BODY_KEY, b"")


_PARSER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="http-parse")


async def off_loop(work: Callable[[], T], size: int) -> T:
    """Run `work` (parsing a body of `size` bytes) in the parsing thread when it is large enough to be worth it.
    One thread: parsing holds the GIL, and each more thread holding it makes the event loop wait longer for its
    turn (8 parses at once in 8 threads: others' calls waited up to 0.4 s; in one, they queue instead)."""
    if size <= INLINE_PARSE_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_PARSER, work)


_MEANING = {b"{": "objects", b"[": "lists", b",": "values"}


def _too_many(char: bytes, most: int, what: str) -> HttpError:
    return HttpError(413, f"{what} holds more {_MEANING[char]} than a request within this server's limits can "
                          f"(at most {most}; --max-images-per-request)", CLOSE)


def parse_json(body: bytes, what: str, counts: dict[bytes, int] | None = None) -> object:
    """JSON → Python; with `counts`, after counting over the bytes what the request may hold at most (413 beyond:
    it cannot be valid, and parsing it would be the cost) for JSON that `receive` could not count as it arrived (the
    header of a binary KServe body); nesting deeper than orjson's 1,024 levels is a 400."""
    for char, most in (counts or {}).items():
        if body.count(char) > most:
            raise _too_many(char, most, what)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc})") from None


_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_FILENAME = re.compile(rb'filename\*?=', re.IGNORECASE)


def multipart_files(content_type: str, body: bytes, max_parts: int) -> list[tuple[str, bytes]]:
    """The parts of a multipart/form-data body (RFC 7578) that carry files, in order: [(content type, bytes)].
    Plain form fields (no filename, text/plain) are skipped: options come as query parameters. More delimiters in
    the body than max_parts files can need: 413 before the parts are split."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InvalidInput("the multipart/form-data Content-Type has no boundary (or one over 70 characters)")
    try:
        delimiter = b"--" + (match.group(1) or match.group(2)).encode("ascii")
    except UnicodeEncodeError:
        raise InvalidInput("the multipart/form-data boundary must be ASCII (RFC 2046)") from None
    if body.count(delimiter) > max_parts + 1:
        raise HttpError(413, f"the multipart body has more than {max_parts} parts (--max-images-per-request)", CLOSE)
    start = body.find(delimiter)
    if start < 0:
        raise InvalidInput("the multipart/form-data body could not be parsed (its boundary never occurs)")
    position, files = start + len(delimiter), []
    separator = b"\r\n" + delimiter
    while body[position:position + 2] != b"--":  # the closing delimiter ends the parts
        line_end = body.find(b"\r\n", position)
        end = body.find(separator, line_end)
        if line_end < 0 or end < 0:
            raise InvalidInput("the multipart/form-data body is truncated (no closing boundary)")
        part = body[line_end + 2:end]
        position = end + len(separator)
        head_end = 0 if part.startswith(b"\r\n") else part.find(b"\r\n\r\n")
        if head_end < 0:
            raise InvalidInput("a multipart part has no blank line after its headers")
        headers, data = _part_headers(part[:head_end]), part[head_end + (2 if head_end == 0 else 4):]
        kind = headers.get(b"content-type", b"text/plain").split(b";")[0].strip().lower().decode("latin-1")
        if not _FILENAME.search(headers.get(b"content-disposition", b"")) and kind == "text/plain":
            continue
        files.append((kind, _transfer_decoded(headers.get(b"content-transfer-encoding", b""), data)))
    if not files:
        raise InvalidInput("the multipart/form-data body holds no file")
    return files


def _part_headers(block: bytes) -> dict[bytes, bytes]:
    headers = {}
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon:
            raise InvalidInput("a multipart part has a malformed header line")
        headers[name.strip().lower()] = value.strip()
    return headers


def _transfer_decoded(encoding: bytes, data: bytes) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in (b"", b"binary", b"8bit", b"7bit"):
        return data
    if encoding == b"base64":
        import binascii
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            raise InvalidInput("a multipart part's base64 content is malformed") from None
    raise InvalidInput(f"a multipart part's Content-Transfer-Encoding {encoding.decode('latin-1')!r} is not supported")
