"""manifest.json as one typed structure: what `python -m export` writes is what the server reads and checks.

    spec = RepositoryManifest(num_classes=10, embedding_dim=128,
                              models={fmt.directory: ModelSpec.of(fmt, sha256)}, ...)
    write_manifest(REPO, spec)                      # REPO/manifest.json (2-space JSON, keys in the format's order)
    spec = load_manifest(REPO / "manifest.json")    # StartupError "<file>: <key>: <problem>" on any defect
    RepositoryManifest.from_dict(data, source) / spec.to_dict()

The format (MANIFEST_FORMAT version MANIFEST_VERSION): format, format_version, model_name_prefix, net,
margin, num_classes, embedding_dim, test_accuracy (null when unknown), verified_accuracy, max_batch_size,
input {name, datatype UINT8, shape, polarity, normalization}, outputs [{name, datatype, shape}],
models {name: {backend, file, sha256}}, files {path: sha256} (every file of the repository but manifest.json,
config.pbtxt included), then what the exporter records for people (onnx, parity, source_checkpoint, exporter;
any other key), kept as written in `records`. Optional keys may be absent or null (files too: a repository
written without it has only its model files checked). Checking that the files exist inside the repository and
have those digests is serving.repository.reader's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.core.errors import StartupError
from serving.repository.format import (BY_BACKEND, DEFAULT_VERSION, IMAGE_DIMS, INPUT, INPUT_DATATYPE,
                                       MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, OUTPUT_DATATYPE,
                                       OUTPUT_EMBEDDING, OUTPUT_KNOWN_SCORE, OUTPUT_LOGITS,
                                       ModelFormat)

__all__ = ["ModelSpec", "TensorSpec", "InputSpec", "RepositoryManifest", "load_manifest", "write_manifest", "read_json"]

_TYPED_KEYS = ("format", "format_version", "model_name_prefix", "net", "margin", "num_classes", "embedding_dim",
               "test_accuracy", "verified_accuracy", "max_batch_size", "input", "outputs", "models", "files")


@dataclass(frozen=True)
class ModelSpec:
    """models.<name>: the model's Triton backend, its file relative to the repository, and the file's sha256."""

    backend: str
    file: str
    sha256: str

    @classmethod
    def of(cls, fmt: ModelFormat, sha256: str, version: str = DEFAULT_VERSION) -> ModelSpec:
        return cls(backend=fmt.backend, file=fmt.file(version), sha256=sha256)

    @property
    def format(self) -> ModelFormat:
        return BY_BACKEND[self.backend]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: the batch axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @staticmethod
    def outputs(num_classes: int, embedding_dim: int, known_score: bool = False) -> tuple[TensorSpec, ...]:
        """The outputs every graph of the repository returns, in order (known_score: graphs exported with an open-set score)."""
        return (TensorSpec(OUTPUT_LOGITS, OUTPUT_DATATYPE, (-1, num_classes)),
                TensorSpec(OUTPUT_EMBEDDING, OUTPUT_DATATYPE, (-1, embedding_dim)),
                *((TensorSpec(OUTPUT_KNOWN_SCORE, OUTPUT_DATATYPE, (-1,)),) if known_score else ()))


@dataclass(frozen=True)
class InputSpec:
    """input: the one tensor the server feeds (by this name), and what the graph does to it."""

    name: str = INPUT
    datatype: str = INPUT_DATATYPE
    shape: tuple[int, ...] | None = (-1, *IMAGE_DIMS)
    polarity: str | None = None  # e.g. "white digit on black (MNIST)"
    normalization: dict[str, float] | None = None  # scale, mean, std folded into the graph

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "datatype": self.datatype,
               "shape": None if self.shape is None else list(self.shape),
               "polarity": self.polarity, "normalization": self.normalization}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class RepositoryManifest:
    num_classes: int
    embedding_dim: int
    models: dict[str, ModelSpec]
    net: str | None = None
    margin: int | None = None
    input: InputSpec = InputSpec()
    max_batch_size: int | None = None  # the largest batch the exported graphs were checked with
    test_accuracy: float | None = None  # the checkpoint's recorded figure; written as null when unknown
    verified_accuracy: dict[str, float] | None = None  # per runtime, on the images the export verified with
    outputs: tuple[TensorSpec, ...] | None = None
    files: dict[str, str] | None = None  # sha256 of every file of the repository but manifest.json
    model_name_prefix: str | None = None
    records: dict[str, Any] = field(default_factory=dict)  # onnx, parity, source_checkpoint, exporter, ...

    def __post_init__(self) -> None:
        clash = set(self.records) & set(_TYPED_KEYS)
        if clash:
            raise ValueError(f"records may not hold the manifest's own keys {sorted(clash)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json, keys in the format's order; None fields are left out, except
        test_accuracy (null: the checkpoint recorded none)."""
        out = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "model_name_prefix": self.model_name_prefix, "net": self.net, "margin": self.margin,
            "num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
            "test_accuracy": self.test_accuracy, "verified_accuracy": self.verified_accuracy,
            "max_batch_size": self.max_batch_size, "input": self.input.to_dict(),
            "outputs": None if self.outputs is None else [o.to_dict() for o in self.outputs],
            "models": {name: spec.to_dict() for name, spec in self.models.items()},
            "files": self.files,
        }
        out = {k: v for k, v in out.items() if v is not None or k == "test_accuracy"}
        return {**out, **self.records}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = MANIFEST_FILE) -> RepositoryManifest:
        """Check and type a parsed manifest.json; raises StartupError "<source>: <key>: <problem>"."""
        return _parse(_Reader(source), data)


def read_json(path: str | Path) -> Any:
    """The parsed JSON of a file; StartupError naming it when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StartupError(f"{path}: not readable JSON ({exc})") from None


def load_manifest(path: str | Path) -> RepositoryManifest:
    """Read and check a manifest.json file (StartupError when it is not readable JSON or has a defect)."""
    return RepositoryManifest.from_dict(read_json(path), path)


def write_manifest(root: str | Path, manifest: RepositoryManifest) -> Path:
    path = Path(root) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ reading


class _Reader:
    """Typed access to manifest keys; every defect becomes a StartupError naming the file and the key."""

    def __init__(self, source: str | Path) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> StartupError:
        return StartupError(f"{self.source}: {key}: {problem}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str = "", required: bool = True):
        """obj[key] if it has the type `kind`; None for an absent or null optional key."""
        label = f"{where}.{key}" if where else key
        if not isinstance(obj, dict) or key not in obj or (obj[key] is None and not required):
            if required:
                raise self.fail(label, "missing")
            return None
        value = obj[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(label, f"expected {_names(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(label, f"expected {_names(kind)}, got {type(value).__name__}")
        return value

    def ints(self, obj: Any, key: str, where: str = "", required: bool = True) -> tuple[int, ...] | None:
        values = self.get(obj, key, list, where, required)
        if values is None:
            return None
        label = f"{where}.{key}" if where else key
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise self.fail(label, f"expected a list of integers, got {values!r}")
        return tuple(values)


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "object", list: "list", str: "string", int: "integer", float: "number"}.get(k, k.__name__)
                       for k in kinds)


def _sha256(reader: _Reader, key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise reader.fail(key, f"not a hex sha256 digest: {value!r}")
    return value.lower()


def _model(reader: _Reader, name: str, spec: Any) -> ModelSpec:
    where = f"models.{name}"
    backend = reader.get(spec, "backend", str, where)
    if backend not in BY_BACKEND:
        raise reader.fail(f"{where}.backend", f"unknown backend {backend!r}; expected one of {', '.join(BY_BACKEND)}")
    relative = reader.get(spec, "file", str, where)
    sha256 = _sha256(reader, f"{where}.sha256", reader.get(spec, "sha256", str, where))
    return ModelSpec(backend=backend, file=relative, sha256=sha256)


def _files(reader: _Reader, data: dict) -> dict[str, str] | None:
    """files: {path relative to the repository: sha256}; absent in repositories written without it (bench's tiny
    repository), which then have their model files checked only (models.<name>.sha256)."""
    files = reader.get(data, "files", dict, required=False)
    if files is None:
        return None
    return {relative: _sha256(reader, f"files.{relative}", sha256) for relative, sha256 in files.items()}


def _input(reader: _Reader, data: dict) -> InputSpec:
    inputs = reader.get(data, "input", dict)
    name = reader.get(inputs, "name", str, "input")
    datatype = reader.get(inputs, "datatype", str, "input")
    if datatype != INPUT_DATATYPE:
        raise reader.fail("input.datatype", f"the server feeds {INPUT_DATATYPE} images, the manifest says {datatype}")
    return InputSpec(name=name, datatype=datatype, shape=reader.ints(inputs, "shape", "input", required=False),
                     polarity=reader.get(inputs, "polarity", str, "input", required=False),
                     normalization=reader.get(inputs, "normalization", dict, "input", required=False))


def _outputs(reader: _Reader, data: dict) -> tuple[TensorSpec, ...] | None:
    outputs = reader.get(data, "outputs", list, required=False)
    if outputs is None:
        return None
    return tuple(TensorSpec(name=reader.get(o, "name", str, f"outputs[{i}]"),
                            datatype=reader.get(o, "datatype", str, f"outputs[{i}]"),
                            shape=reader.ints(o, "shape", f"outputs[{i}]"))
                 for i, o in enumerate(outputs))


def _parse(reader: _Reader, data: Any) -> RepositoryManifest:
    if not isinstance(data, dict):
        raise StartupError(f"{reader.source}: expected a JSON object at the top level")
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
    inputs = _input(reader, data)
    models_spec = reader.get(data, "models", dict)
    if not models_spec:
        raise reader.fail("models", "empty; the repository has nothing to serve")
    models = {name: _model(reader, name, spec) for name, spec in models_spec.items()}
    accuracy = reader.get(data, "test_accuracy", (int, float), required=False)
    margin = reader.get(data, "margin", int, required=False)
    max_batch_size = reader.get(data, "max_batch_size", int, required=False)
    if max_batch_size is not None and max_batch_size < 1:
        raise reader.fail("max_batch_size", f"must be >= 1, got {max_batch_size}")
    return RepositoryManifest(
        num_classes=num_classes, embedding_dim=embedding_dim, models=models,
        net=reader.get(data, "net", str, required=False), margin=margin,
        input=inputs, max_batch_size=max_batch_size, test_accuracy=accuracy,
        verified_accuracy=reader.get(data, "verified_accuracy", dict, required=False), outputs=_outputs(reader, data),
        files=_files(reader, data),
        model_name_prefix=reader.get(data, "model_name_prefix", str, required=False),
        records={k: v for k, v in data.items() if k not in _TYPED_KEYS})
