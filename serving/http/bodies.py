"""Reading request bodies within the server's limits: a size known from Content-Length is refused (413) before
anything is read, a body that grows past the limit is cut off (413), and one that trickles in slower than the
timeout allows is dropped (408). Multipart bodies are split with the standard library's MIME parser."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy

from aiohttp import web

from serving.http.errors import HttpError

__all__ = ["read_body", "multipart_files"]


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise HttpError(413, f"the request body of {request.content_length} bytes is larger than the "
                             f"{limit} this server accepts (--max-message-bytes)", {"Connection": "close"})

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.content.iter_chunked(1 << 16):
            total += len(chunk)
            if total > limit:
                raise HttpError(413, f"the request body is larger than the {limit} bytes this server accepts "
                                     "(--max-message-bytes)", {"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {timeout:g} s",
                        {"Connection": "close"}) from None


def multipart_files(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart/form-data body that carry data, in order: [(content type, bytes)]."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise HttpError(400, "the multipart/form-data body could not be parsed (boundary missing or wrong)")
    parts = []
    for part in message.iter_parts():
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is None and part.get_content_type() == "text/plain":
            continue  # a plain form field (options come as query parameters)
        parts.append((part.get_content_type(), data))
    if not parts:
        raise HttpError(400, "the multipart/form-data body holds no file")
    return parts
