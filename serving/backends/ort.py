"""ONNX Runtime backend: an InferenceSession on the repository's model.onnx.

The CUDA execution provider is requested only when the server resolved the device to CUDA (a GPU is
present) and this onnxruntime build offers it; `providers` reports what the session actually uses, since
ONNX Runtime silently falls back to CPU when the CUDA provider cannot start.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from serving.backends.base import Backend
from serving.core.errors import StartupError
from serving.logs import log_event
from serving.repository.format import BY_KIND, INPUT, OPTIONAL_OUTPUTS, OUTPUTS

__all__ = ["OrtBackend"]

logger = logging.getLogger("serving.backends.ort")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def _preload_cuda_libraries(ort) -> None:
    """Load the CUDA runtime and cuDNN from the nvidia-* wheels (requirements-serving-cuda.txt) so the CUDA provider
    finds them without torch (which used to load them as a side effect of asking for the GPU). Without those wheels
    the system's libraries are used; ONNX Runtime's own messages go to the log, not to stdout."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload(directory="")
    except Exception as exc:  # missing wheels are not an error: the session reports what it could start
        printed.write(str(exc))
    if printed.getvalue().strip():
        log_event(logger, logging.INFO, "onnxruntime_preload", detail=printed.getvalue().strip()[:500])


class OrtBackend(Backend):
    kind = BY_KIND["onnx"].backend  # "onnxruntime", as GetModelInfo reports it

    def __init__(self, path: str | Path, device: str = "cpu", strict: bool = False,
                 input_name: str = INPUT, output_names: tuple[str, str] = OUTPUTS,
                 intra_op_threads: int | None = None) -> None:
        """device: "cuda" or "cpu" as resolved; strict: fail (instead of falling back to CPU) when CUDA
        was asked for explicitly but ONNX Runtime cannot use it; input_name: the manifest's input.name;
        intra_op_threads: the session's intra-op pool size (None: ONNX Runtime's default, one per core)."""
        import onnxruntime as ort

        wanted = [CPU_PROVIDER]
        if device == "cuda":
            if CUDA_PROVIDER in ort.get_available_providers():
                _preload_cuda_libraries(ort)
                wanted = [CUDA_PROVIDER, CPU_PROVIDER]
            elif strict:
                raise StartupError(f"--device cuda: this onnxruntime build has no {CUDA_PROVIDER} "
                                   f"(available: {', '.join(ort.get_available_providers())})")
            else:
                log_event(logger, logging.WARNING, "onnxruntime_cuda_unavailable", fallback="cpu",
                          available=ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; the CUDA fallback is reported through `providers`
        # ONNX Runtime's intra-op threads spin after each call by default, burning the cores the event loop
        # and the gRPC threads need between calls; a server's calls are not back-to-back enough to gain from it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:
            raise StartupError(f"{path}: cannot load ONNX model ({str(exc).strip().splitlines()[0]})") from exc
        self.providers = tuple(self._session.get_providers())
        self.intra_op_threads = self._session.get_session_options().intra_op_num_threads  # 0: one per core
        if device == "cuda" and CUDA_PROVIDER not in self.providers:
            if strict:
                raise StartupError(f"--device cuda: onnxruntime could not start {CUDA_PROVIDER} "
                                   f"(session uses {', '.join(self.providers)})")
            log_event(logger, logging.WARNING, "onnxruntime_cuda_fallback", providers=list(self.providers))
        self.device = "cuda:0" if CUDA_PROVIDER in self.providers else "cpu"
        inputs = {i.name: i.type for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs.get(input_name) != "tensor(uint8)" or len(inputs) != 1:
            raise StartupError(f"{path}: expected one input {input_name!r} of type tensor(uint8), found {inputs}")
        missing = [name for name in output_names if name not in outputs]
        if missing:
            raise StartupError(f"{path}: graph lacks output(s) {missing}; it has {outputs}")
        self._input = input_name
        # known_score (newer repositories) comes third when the graph has it; older graphs serve without.
        self._outputs = list(output_names) + [name for name in OPTIONAL_OUTPUTS if name in outputs]
        self.has_known_score = len(self._outputs) > len(output_names)
        types = {o.name: o.type for o in self._session.get_outputs()}
        self._float32 = all(types[name] == "tensor(float)" for name in self._outputs)  # as exported: no cast per call
        # On CPU, the binding's run directly: InferenceSession.run re-validates the input names, OrtValue ownership
        # and WebGPU graph capture on every call (~15% of the GIL-holding time of a batch-1 request in py-spy, issue
        # 16), all fixed at load here. CUDA sessions keep the public run for its provider fallback.
        binding = getattr(self._session, "_sess", None)
        self._run = binding.run if binding is not None and self.device == "cpu" else self._session.run

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        outputs = self._run(self._outputs, {self._input: images}, None)
        return tuple(outputs) if self._float32 else tuple(out.astype(np.float32, copy=False) for out in outputs)

    def close(self) -> None:
        self._session = self._run = None
