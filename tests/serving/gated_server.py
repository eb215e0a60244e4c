"""`python tests/serving/gated_server.py FLAGS...`: `python -m serving FLAGS...` with gates a test controls.

A test that needs calls *in flight* (a drain that gives up, a full queue, a busy decode lane, a model still
loading) holds them at a gate instead of guessing how long real work takes on this machine:

    LSOFTMAX_TEST_GATE_DIR=DIR: while the file DIR/hold-NAME exists, every call reaching gate NAME waits (polling
    every few ms); deleting the file lets them all go. Each call that finds the gate closed logs
    {"event": "gate_waiting", "gate": NAME, "count": <calls held so far>, "held": <waiting now>, ...} and, once
    let go, {"event": "gate_passed", "gate": NAME, "held": <still waiting>}, in the server's own log format.

Gates (at the seams serving keeps stable for tests):
    infer         serving.backends.ort.OrtBackend.infer: every ONNX backend call (warm-up included), in the model's
                  worker thread (the gated server never runs a batch on the event loop: it adds
                  `--inline-below-us 0`, so a held call holds only its thread, as a slow model would); raw-pixel
                  requests reach it without decoding. The record carries `images`.
                  TorchScriptBackend.infer goes through the same gate when that class is where it was (the GPU
                  tests serve TorchScript).
    decode        serving.images.lanes.prepare_image: every encoded image being decoded, in a decode thread.
    decode-large  the same, only for images over serving.images.lanes.SMALL_PIXELS (the large lane's).
The decode records carry `index` and `size`. Without the variable, or with no hold file, it is `python -m serving`.
Test side: tests/serving/conftest.py's `Gates` (`helpers.Gates`, the `gates` fixture).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[0] = str(ROOT)  # run as a script: import serving from this checkout, not from tests/serving/

GATE_DIR_ENV = "LSOFTMAX_TEST_GATE_DIR"
POLL_S = 0.002

logger = logging.getLogger("lsoftmax.test_gates")
logger.setLevel(logging.INFO)  # logged whatever --log-level says: tests wait on these lines


class Gate:
    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.hold = folder / f"hold-{name}"
        self._lock = threading.Lock()
        self.count = 0  # calls that found the gate closed, ever
        self.held = 0  # calls waiting at it now

    def __call__(self, **fields) -> None:
        if not self.hold.exists():
            return
        from serving.logs import log_event

        with self._lock:
            self.count += 1
            self.held += 1
            count, held = self.count, self.held
        log_event(logger, logging.INFO, "gate_waiting", gate=self.name, count=count, held=held, **fields)
        try:
            while self.hold.exists():
                time.sleep(POLL_S)
        finally:
            with self._lock:
                self.held -= 1
                held = self.held
        log_event(logger, logging.INFO, "gate_passed", gate=self.name, held=held)


def install(folder: Path) -> None:
    from serving.images import lanes as decode_queue
    from serving.backends import ort

    infer_gate = Gate(folder, "infer")
    real_infer = ort.OrtBackend.infer

    def infer(self, images):
        infer_gate(images=len(images))
        return real_infer(self, images)

    ort.OrtBackend.infer = infer
    try:  # not one of the stable seams: gated when it is there (importing it does not import torch)
        from serving.backends.torchscript import TorchScriptBackend

        real_torch_infer = TorchScriptBackend.infer

        def torch_infer(self, images):
            infer_gate(images=len(images))
            return real_torch_infer(self, images)

        TorchScriptBackend.infer = torch_infer
    except (ImportError, AttributeError):
        pass

    decode_gate, large_gate = Gate(folder, "decode"), Gate(folder, "decode-large")
    real_prepare = decode_queue.prepare_image
    small_pixels = getattr(decode_queue, "SMALL_PIXELS", 512 * 512)

    def prepare_image(index, im, *args, **kwargs):
        width, height = im.size
        decode_gate(index=index, size=[width, height])
        if width * height > small_pixels:
            large_gate(index=index, size=[width, height])
        return real_prepare(index, im, *args, **kwargs)

    decode_queue.prepare_image = prepare_image


if __name__ == "__main__":
    if os.environ.get(GATE_DIR_ENV):
        install(Path(os.environ[GATE_DIR_ENV]))
        if "--inline-below-us" not in sys.argv:
            sys.argv += ["--inline-below-us", "0"]
    from serving.server import run_cli

    run_cli()
