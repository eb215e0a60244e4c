"""Open a model repository: its manifest.json checked, the model to serve chosen, each model file's sha256 verified.

    manifest = read_manifest("REPO")                       # StartupError naming the file and the key on any defect
    entry = manifest.select(model=None, backend="onnx")    # --model NAME / --backend onnx|torchscript
    verify_sha256(entry)                                   # StartupError on a mismatch, in the model file or in
                                                           # any file manifest.json lists for it (config.pbtxt)

Layout (Triton's, written by `python -m export`): REPO/manifest.json, REPO/<name>/config.pbtxt,
REPO/<name>/<version>/model.{onnx,pt}. The names are serving.repository.format's, manifest.json's structure
serving.repository.manifest's, config.pbtxt's serving.repository.config's. Imports no generated stubs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from serving.core.errors import StartupError
from serving.repository.calibration import Calibration, check_model_calibration, model_calibration
from serving.repository.format import (BY_KIND, CONFIG_FILE, DEFAULT_VERSION, MANIFEST_FILE, MANIFEST_FORMAT,
                                       MANIFEST_VERSION, ModelFormat, precision_of)
from serving.repository.manifest import ModelSpec, RepositoryManifest, read_json

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "ListedFile", "Manifest", "ModelEntry", "read_manifest",
           "verify_sha256", "file_sha256"]


@dataclass(frozen=True)
class ListedFile:
    """A file manifest.json's `files` lists, and the sha256 it lists it with."""

    relative: str  # as manifest.json writes it, e.g. "lsoftmax_mnist_onnx/config.pbtxt"
    path: Path
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    backend: str  # "onnxruntime" or "pytorch", as in config.pbtxt
    kind: str  # "onnx" or "torchscript", as on the command line
    path: Path
    sha256: str
    version: str
    # The files manifest.json's `files` lists in the model's folder (config.pbtxt, the model file) and outside every
    # model's folder; verify_sha256 checks them with the model file. Empty for a manifest without `files`.
    listed: tuple[ListedFile, ...] = ()

    @property
    def format(self) -> ModelFormat:
        return BY_KIND[self.kind]

    @property
    def precision(self) -> str:
        """"int8" for the quantised ONNX model, else "fp32"."""
        return precision_of(self.name)


@dataclass(frozen=True)
class Manifest:
    """A repository as the server opened it: the checked manifest.json (`spec`) and its model files located."""

    root: Path
    spec: RepositoryManifest
    models: dict[str, ModelEntry]
    raw: dict[str, Any] = field(repr=False)  # manifest.json as read (GetModelInfo reports it)

    @property
    def net(self) -> str:
        return self.spec.net or ""

    @property
    def margin(self) -> int:
        return self.spec.margin or 0

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    @property
    def input_name(self) -> str:
        """The graph input the server feeds, and the one KServe clients name."""
        return self.spec.input.name

    @property
    def max_batch_size(self) -> int | None:
        """The largest batch the exported graphs were checked with, if recorded."""
        return self.spec.max_batch_size

    @property
    def test_accuracy(self) -> float | None:
        return None if self.spec.test_accuracy is None else float(self.spec.test_accuracy)

    def calibration(self, model: str) -> Calibration:
        """The temperature and threshold `model`'s answers use: its own (the INT8 model's, in newer repositories), else
        the repository's, fitted on the FP32 graph (serving.repository.calibration)."""
        return model_calibration(self.spec, model, self.root / MANIFEST_FILE)

    def served(self, model: str | None = None, backend: str | None = None,
               precision: str | None = None) -> list[ModelEntry]:
        """The models a server loads: the one --model names; else every model of --backend's format (both ONNX
        models of a repository exported with --int8, so KServe clients keep the FP32 one by name whichever the
        typed API serves); else every model of the repository."""
        if model is not None:
            return [self.select(model, backend)]
        if backend is not None:
            kind = self.select(None, backend, precision).kind  # refuses a format or precision the repository lacks
            return [self.models[name] for name in sorted(self.models) if self.models[name].kind == kind]
        return [self.models[name] for name in sorted(self.models)]

    def select(self, model: str | None = None, backend: str | None = None,
               precision: str | None = None) -> ModelEntry:
        """The model the typed API serves: --model NAME; else the model of --backend's format, of `precision` when
        given (serving.precision chooses it); else the ONNX one (docs/architecture.md §5): the FP32 one unless
        `precision` says "int8"; or the first by name when the repository has no ONNX model."""
        if model is not None:
            if model not in self.models:
                raise StartupError(f"model {model!r} is not in {self.root / MANIFEST_FILE}; "
                                   f"it has {', '.join(sorted(self.models))}")
            entry = self.models[model]
            if backend is not None and entry.kind != backend:
                raise StartupError(f"--model {model} is a {entry.kind} model but --backend {backend} was given")
            return entry
        wanted = backend or "onnx"
        matches = sorted((m for m in self.models.values() if m.kind == wanted), key=lambda m: m.name)
        if precision is not None:
            matches = [m for m in matches if m.precision == precision]
            if not matches:
                raise StartupError(f"{self.root / MANIFEST_FILE} has no {precision.upper()} {wanted} model "
                                   f"(models: {', '.join(sorted(self.models))})")
        if matches:
            return matches[0]
        if backend is None:
            return self.models[sorted(self.models)[0]]
        raise StartupError(f"{self.root / MANIFEST_FILE} has no {wanted} model "
                           f"(models: {', '.join(f'{m.name} ({m.kind})' for m in self.models.values())})")


def _model_dir(spec: ModelSpec) -> PurePosixPath | None:
    """The model's folder relative to the repository (where its config.pbtxt is: the model file's version folder's
    parent, as serving.repository.model_config reads it); None for a model file without one."""
    folder = PurePosixPath(spec.file).parent.parent
    return None if folder == PurePosixPath(".") else folder


def _listed(path: Path, root: Path, spec: RepositoryManifest) -> dict[str, list[ListedFile]]:
    """manifest.json's `files` by model: {model name: the files listed in its folder, then those in no model's
    folder}. Every listed path must stay inside the repository; whether the file is there is verify_sha256's to say
    (a missing one refuses the models it belongs to, not the others)."""
    folders = {name: _model_dir(model) for name, model in spec.models.items()}
    by_model: dict[str, list[ListedFile]] = {name: [] for name in spec.models}
    shared: list[ListedFile] = []
    for relative, sha256 in (spec.files or {}).items():
        if relative == MANIFEST_FILE:
            continue  # it cannot list its own digest; were one written, it would name an older manifest.json
        target = root / relative
        if not target.resolve().is_relative_to(root.resolve()) or PurePosixPath(relative).is_absolute():
            raise StartupError(f"{path}: files.{relative}: points outside the repository")
        listed = ListedFile(relative=relative, path=target, sha256=sha256)
        owners = [name for name, folder in folders.items()
                  if folder is not None and PurePosixPath(relative).is_relative_to(folder)]
        for name in owners:
            by_model[name].append(listed)
        if not owners:
            shared.append(listed)
    return {name: [*files, *shared] for name, files in by_model.items()}


def _model_entry(path: Path, root: Path, name: str, spec: ModelSpec, listed: list[ListedFile]) -> ModelEntry:
    """Locate models.<name>.file inside the repository (the manifest's own checks are already done)."""
    where = f"models.{name}.file"
    target = (root / spec.file).resolve()
    if not target.is_relative_to(root.resolve()):
        raise StartupError(f"{path}: {where}: {spec.file!r} points outside the repository")
    if not target.is_file():
        raise StartupError(f"{path}: {where}: {target} does not exist")
    parts = Path(spec.file).parts
    version = parts[1] if len(parts) >= 3 and parts[1].isdigit() else DEFAULT_VERSION
    return ModelEntry(name=name, backend=spec.backend, kind=spec.format.kind, path=target, sha256=spec.sha256,
                      version=version, listed=tuple(listed))


def read_manifest(root: str | Path) -> Manifest:
    """Parse and check REPO/manifest.json; raises StartupError with a message a user can act on."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise StartupError(f"{root}: model repository directory does not exist")
    if not path.is_file():
        raise StartupError(f"{path}: no manifest.json in the model repository (export one with `python -m export`)")
    raw = read_json(path)
    spec = RepositoryManifest.from_dict(raw, path)
    check_model_calibration(spec, path)
    listed = _listed(path, root, spec)
    models = {name: _model_entry(path, root, name, model, listed[name]) for name, model in spec.models.items()}
    return Manifest(root=root, spec=spec, models=models, raw=raw)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(entry: ModelEntry) -> None:
    """Refuse a model whose files are not the ones the manifest describes: the model file (models.<name>.sha256)
    and every file `files` lists for it (its config.pbtxt: an edited max_batch_size is refused, not served)."""
    actual = file_sha256(entry.path)
    if actual != entry.sha256:
        raise StartupError(f"{entry.path}: sha256 mismatch for model {entry.name!r}: manifest says {entry.sha256}, "
                           f"file has {actual}; the file was modified or the repository is incomplete. "
                           "Re-export the repository.")
    digests = {entry.path: actual}
    for listed in entry.listed:
        if not listed.path.is_file():
            raise StartupError(f"{listed.path}: listed in {MANIFEST_FILE} (files.{listed.relative}) for model "
                               f"{entry.name!r} but missing; the repository is incomplete. Re-export the repository.")
        resolved = listed.path.resolve()
        if resolved not in digests:
            digests[resolved] = file_sha256(resolved)
        if digests[resolved] != listed.sha256:
            hint = (" (to serve smaller batches than its max_batch_size, start the server with --max-batch-size)"
                    if listed.path.name == CONFIG_FILE else "")
            raise StartupError(f"{listed.path}: sha256 mismatch for model {entry.name!r}: {MANIFEST_FILE} "
                               f"(files.{listed.relative}) says {listed.sha256}, file has {digests[resolved]}; the "
                               f"file was modified or the repository is incomplete. Re-export the repository{hint}.")
