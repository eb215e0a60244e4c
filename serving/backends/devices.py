"""Which device a backend runs on, decided without importing PyTorch.

--device auto|cpu|cuda is resolved from the NVIDIA driver itself (libcuda's cuInit and cuDeviceGetCount through
ctypes): a process that serves ONNX never loads torch (hundreds of MiB resident) only to ask whether a GPU
exists. Each backend then checks that *it* can use the GPU (ONNX Runtime's CUDA provider and its libraries,
torch.cuda for TorchScript) and falls back to the CPU, or fails when CUDA was asked for explicitly.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

from serving.core.errors import StartupError

__all__ = ["DEVICES", "cuda_device_count", "resolve_device", "module_available"]

DEVICES = ("auto", "cpu", "cuda")
CUDA_DRIVER_LIBRARY = "libcuda.so.1"


@functools.cache
def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports (0 when the driver library is absent or cuInit fails, e.g. no device)."""
    try:
        driver = ctypes.CDLL(CUDA_DRIVER_LIBRARY)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:  # not the CUDA driver API
        return 0
    return max(0, count.value)


def resolve_device(requested: str) -> str:
    """auto → "cuda" when the driver reports a GPU, else "cpu"; an explicit "cuda" without one is a StartupError."""
    if requested not in DEVICES:
        raise StartupError(f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if cuda_device_count() > 0:
        return "cuda"
    if requested == "cuda":
        raise StartupError(f"--device cuda was requested but no CUDA GPU is available (the NVIDIA driver, "
                           f"{CUDA_DRIVER_LIBRARY}, is missing or reports no device)")
    return "cpu"


def module_available(name: str) -> bool:
    """Whether `name` can be imported, found without importing it (a server without torch serves ONNX only)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked on purpose)
        return False
