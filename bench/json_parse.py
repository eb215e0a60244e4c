"""The JSON parsers a request body may go through, on the largest valid bodies: the standard library's json and
orjson (what serving.http.bodies uses), best of 5 each.

    python -m bench.json_parse

Bodies: a KServe request of 256 images as nested [N,1,28,28] lists, pretty-printed (every number a line), and a
typed request of 256 images of 58 KB each as base64 strings.
"""

from __future__ import annotations

import base64
import json
import os
import time

import orjson


def _best_ms(work, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    kserve = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [256, 1, 28, 28],
                                     "data": [[[[255] * 28] * 28]] * 256}]}, indent=1).encode()
    typed = json.dumps({"images": [{"encoded": base64.b64encode(os.urandom(58_000)).decode()}] * 256}).encode()
    for name, body in (("KServe JSON, 256 images, pretty-printed", kserve), ("typed JSON, 256 x 58 KB base64", typed)):
        print(f"{name} ({len(body) / 1e6:.1f} MB): json.loads {_best_ms(lambda: json.loads(body)):.1f} ms, "
              f"orjson.loads {_best_ms(lambda: orjson.loads(body)):.1f} ms")


if __name__ == "__main__":
    main()
