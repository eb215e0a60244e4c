"""What the attackers and victims of bench.abuse put on the wire: addresses, request heads, images."""

from __future__ import annotations

import io
import json


HOST = "127.0.0.1"
PIXELS = 784  # one 28x28 image
IMAGE_SHAPE = (1, 28, 28)  # serving.repository.format.IMAGE_DIMS (not imported: bench may measure another serving/)
SLOWLORIS_HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
SLOWLORIS_DRIP = b"X-Slow: "  # then b"a" forever, never a CRLF: the head never ends
LIVE_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
TRICKLE_HEAD = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000000\r\n\r\n")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
H2_FRAMES = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}




def digit_png() -> bytes:
    """A 28x28 greyscale PNG of a '1' (MNIST polarity: white on black)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 13:16] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def kserve_image_json(model_input: str = "image") -> bytes:
    """One 28x28 UINT8 image as a KServe v2 infer request in JSON."""
    data = [0] * PIXELS
    for row in range(4, 24):
        data[row * 28 + 13: row * 28 + 16] = [255, 255, 255]
    return json.dumps({"inputs": [{"name": model_input, "datatype": "UINT8", "shape": [1, *IMAGE_SHAPE],
                                   "data": data}]}, separators=(",", ":")).encode()


