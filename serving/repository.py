"""Read a model repository's manifest.json defensively, choose the model to serve and verify its sha256.

    manifest = read_manifest("REPO")                       # StartupError naming the file and the key on any defect
    entry = manifest.select(model=None, backend="onnx")    # --model NAME / --backend onnx|torchscript
    verify_sha256(entry)                                   # StartupError on a mismatch

Layout (Triton's, written by `python -m export`): REPO/manifest.json, REPO/<name>/config.pbtxt,
REPO/<name>/<version>/model.{onnx,pt}. Needs nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import StartupError

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "Manifest", "ModelEntry", "read_manifest", "verify_sha256",
           "file_sha256"]

MANIFEST_FORMAT = "lsoftmax-serve/model-repository"
MANIFEST_VERSION = 1
_KINDS = {"onnxruntime": "onnx", "pytorch": "torchscript"}  # manifest backend → CLI backend name


@dataclass(frozen=True)
class ModelEntry:
    name: str
    backend: str  # "onnxruntime" or "pytorch", as in config.pbtxt
    kind: str  # "onnx" or "torchscript", as on the command line
    path: Path
    sha256: str
    version: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict[str, Any] = field(repr=False)
    net: str
    margin: int
    num_classes: int
    embedding_dim: int
    test_accuracy: float | None
    input_name: str
    models: dict[str, ModelEntry]
    max_batch_size: int | None = None  # the largest batch the exported graphs were checked with, if recorded

    def served(self, model: str | None = None, backend: str | None = None) -> list[ModelEntry]:
        """The models a server loads: the one --model / --backend names, else every model of the repository."""
        if model is None and backend is None:
            return [self.models[name] for name in sorted(self.models)]
        return [self.select(model, backend)]

    def select(self, model: str | None = None, backend: str | None = None) -> ModelEntry:
        """The model the typed API serves: --model NAME; else the model of --backend's format; else the ONNX
        one (DESIGN §2), or the first by name when the repository has no ONNX model."""
        if model is not None:
            if model not in self.models:
                raise StartupError(f"model {model!r} is not in {self.root / 'manifest.json'}; "
                                   f"it has {', '.join(sorted(self.models))}")
            entry = self.models[model]
            if backend is not None and entry.kind != backend:
                raise StartupError(f"--model {model} is a {entry.kind} model but --backend {backend} was given")
            return entry
        wanted = backend or "onnx"
        matches = sorted((m for m in self.models.values() if m.kind == wanted), key=lambda m: m.name)
        if matches:
            return matches[0]
        if backend is None:
            return self.models[sorted(self.models)[0]]
        raise StartupError(f"{self.root / 'manifest.json'} has no {wanted} model "
                           f"(models: {', '.join(f'{m.name} ({m.kind})' for m in self.models.values())})")


class _Reader:
    """Typed access to manifest keys; every defect becomes a StartupError naming the file and the key."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, problem: str) -> StartupError:
        return StartupError(f"{self.path}: {key}: {problem}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str = "", required: bool = True):
        label = f"{where}.{key}" if where else key
        if not isinstance(obj, dict) or key not in obj:
            if required:
                raise self.fail(label, "missing")
            return None
        value = obj[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(label, f"expected {_names(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(label, f"expected {_names(kind)}, got {type(value).__name__}")
        return value


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "object", list: "list", str: "string", int: "integer", float: "number"}.get(k, k.__name__)
                       for k in kinds)


def _model_entry(reader: _Reader, root: Path, name: str, spec: Any) -> ModelEntry:
    where = f"models.{name}"
    backend = reader.get(spec, "backend", str, where)
    if backend not in _KINDS:
        raise reader.fail(f"{where}.backend", f"unknown backend {backend!r}; expected one of {', '.join(_KINDS)}")
    relative = reader.get(spec, "file", str, where)
    sha256 = reader.get(spec, "sha256", str, where).lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise reader.fail(f"{where}.sha256", f"not a hex sha256 digest: {sha256!r}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise reader.fail(f"{where}.file", f"{relative!r} points outside the repository")
    if not path.is_file():
        raise reader.fail(f"{where}.file", f"{path} does not exist")
    parts = Path(relative).parts
    version = parts[1] if len(parts) >= 3 and parts[1].isdigit() else "1"
    return ModelEntry(name=name, backend=backend, kind=_KINDS[backend], path=path, sha256=sha256, version=version)


def read_manifest(root: str | Path) -> Manifest:
    """Parse and check REPO/manifest.json; raises StartupError with a message a user can act on."""
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        raise StartupError(f"{root}: model repository directory does not exist")
    if not path.is_file():
        raise StartupError(f"{path}: no manifest.json in the model repository (export one with `python -m export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StartupError(f"{path}: not readable JSON ({exc})") from None
    reader = _Reader(path, data)
    if not isinstance(data, dict):
        raise StartupError(f"{path}: expected a JSON object at the top level")
    fmt = reader.get(data, "format", str)
    if fmt != MANIFEST_FORMAT:
        raise reader.fail("format", f"expected {MANIFEST_FORMAT!r}, got {fmt!r}")
    version = reader.get(data, "format_version", int)
    if version != MANIFEST_VERSION:
        raise reader.fail("format_version", f"this server reads version {MANIFEST_VERSION}, the file is version {version}")
    num_classes = reader.get(data, "num_classes", int)
    embedding_dim = reader.get(data, "embedding_dim", int)
    if num_classes < 2 or embedding_dim < 1:
        raise reader.fail("num_classes/embedding_dim", f"implausible values {num_classes}/{embedding_dim}")
    inputs = reader.get(data, "input", dict)
    input_name = reader.get(inputs, "name", str, "input")
    datatype = reader.get(inputs, "datatype", str, "input")
    if datatype != "UINT8":
        raise reader.fail("input.datatype", f"the server feeds UINT8 images, the manifest says {datatype}")
    models_spec = reader.get(data, "models", dict)
    if not models_spec:
        raise reader.fail("models", "empty; the repository has nothing to serve")
    models = {name: _model_entry(reader, root, name, spec) for name, spec in models_spec.items()}
    accuracy = reader.get(data, "test_accuracy", (int, float), required=False)
    margin = reader.get(data, "margin", int, required=False)
    max_batch_size = reader.get(data, "max_batch_size", int, required=False)
    if max_batch_size is not None and max_batch_size < 1:
        raise reader.fail("max_batch_size", f"must be >= 1, got {max_batch_size}")
    return Manifest(root=root, raw=data, net=str(data.get("net", "")), margin=int(margin or 0),
                    num_classes=num_classes, embedding_dim=embedding_dim,
                    test_accuracy=None if accuracy is None else float(accuracy), input_name=input_name,
                    models=models, max_batch_size=max_batch_size)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(entry: ModelEntry) -> None:
    """Refuse a model file whose content is not the one the manifest describes."""
    actual = file_sha256(entry.path)
    if actual != entry.sha256:
        raise StartupError(f"{entry.path}: sha256 mismatch for model {entry.name!r}: manifest says {entry.sha256}, "
                           f"file has {actual}; the file was modified or the repository is incomplete. "
                           "Re-export the repository.")
