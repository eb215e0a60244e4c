"""Write and reload the two graph formats: TorchScript (model.pt) and ONNX (model.onnx).

Both take `image` UINT8 [N, 1, 28, 28] and return `logits` FP32 [N, C], `embedding` FP32 [N, D] and
`known_score` FP32 [N], with a dynamic batch axis (the names are serving.repository.format's INPUT and ALL_OUTPUTS).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from serving.repository.format import ALL_OUTPUTS, IMAGE_DIMS, INPUT

__all__ = ["write_torchscript", "write_onnx", "load_torchscript", "load_onnx_session", "run_torchscript", "run_onnx",
           "FORBIDDEN_ONNX_OPS", "onnx_report"]

# Ops that would betray a margin left in the graph (acos / cos(m theta) / floor for k).
FORBIDDEN_ONNX_OPS = frozenset({"Acos", "Cos", "Floor"})


def write_torchscript(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        scripted = torch.jit.script(module)
    scripted.save(str(path))


def write_onnx(module: torch.nn.Module, path: Path, opset: int = 17) -> None:
    example = torch.zeros(2, *IMAGE_DIMS, dtype=torch.uint8)
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter (dynamo=False) gives a compact graph with a symbolic batch axis.
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT], output_names=list(ALL_OUTPUTS),
                          dynamic_axes={INPUT: batch, **{name: batch for name in ALL_OUTPUTS}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        return torch.jit.load(str(path), map_location="cpu").eval()


def load_onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def run_torchscript(module, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(logits, embedding, known_score) as numpy."""
    return tuple(out.numpy() for out in module(images))


def run_onnx(session, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(logits, embedding, known_score) as numpy."""
    return tuple(session.run(list(ALL_OUTPUTS), {INPUT: images.numpy()}))


def onnx_report(path: Path) -> dict:
    """Full onnx.checker pass, opset and op types; raises ValueError on a forbidden op or old opset."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    op_types = sorted({node.op_type for node in model.graph.node})
    forbidden = FORBIDDEN_ONNX_OPS.intersection(op_types)
    if forbidden:
        raise ValueError(f"{path}: ONNX graph still holds margin ops {sorted(forbidden)}")
    if opset < 17:
        raise ValueError(f"{path}: opset {opset} < 17")
    return {"opset": opset, "op_types": op_types,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}
