"""Before the server binds anything: what the flags and the repository say to serve (the plan), and loading one model.

Step 1 of the lifecycle (serving.server, docs/architecture.md §3): the repository, every served file's sha256, each
model's config.pbtxt and batching, TLS files and the token are read and checked, so that a defect stops the server
with one StartupError before it answers; models whose backend this installation lacks are skipped by name.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from serving.backends import REQUIRED_MODULE, backend_available, load_backend
from serving.backends.batching import BatchingConfig
from serving.backends.runner import ModelRunner
from serving.core.errors import StartupError
from serving.grpc.typed import Limits
from serving.logs import log_event
from serving.metrics import ModelStats
from serving.precision import choose_precision, default_max_batch_size
from serving.repository.model_config import read_model_config
from serving.repository.reader import Manifest, ModelEntry, read_manifest, verify_sha256
from serving.security import TlsConfig, read_token

__all__ = ["Plan", "make_plan", "load_model"]

logger = logging.getLogger("serving")


def load_model(entry: ModelEntry, manifest: Manifest, device: str, warmup_batch: int, batching: BatchingConfig,
          stats: ModelStats, intra_op_threads: int | None = None) -> tuple[ModelRunner, dict]:
    """Runs in a worker thread: load the graph, warm it up, check it against the manifest."""
    start = time.perf_counter()
    try:
        backend = load_backend(entry.kind, entry.path, device, input_name=manifest.input_name,
                               intra_op_threads=intra_op_threads)
    except OSError as exc:
        raise StartupError(f"{exc.filename or entry.path}: cannot read model {entry.name!r} "
                           f"({exc.strerror or exc})") from None
    loaded = time.perf_counter()
    classes, dim = backend.warmup(batch_sizes=(1, warmup_batch))
    if (classes, dim) != (manifest.num_classes, manifest.embedding_dim):
        backend.close()
        raise StartupError(f"{entry.path}: the graph outputs {classes} logits and a {dim}-D embedding, the manifest "
                           f"says {manifest.num_classes} and {manifest.embedding_dim}")
    timing = {"load_s": round(loaded - start, 3), "warmup_s": round(time.perf_counter() - loaded, 3)}
    return ModelRunner(backend, entry, manifest, batching, stats), timing


def _batching(args: argparse.Namespace, entries: list[ModelEntry], manifest: Manifest) -> tuple[dict, dict]:
    """Each model's config.pbtxt and BatchingConfig; --max-batch-size may not exceed the model's (without it, the
    INT8 model's backend batches are smaller: serving.precision.default_max_batch_size)."""
    configs, batching = {}, {}
    for entry in entries:
        config = configs[entry.name] = read_model_config(entry, manifest)
        limit = args.max_batch_size or default_max_batch_size(entry, config.max_batch_size)
        if limit > config.max_batch_size:
            raise StartupError(f"--max-batch-size {limit} exceeds model {entry.name!r}'s max_batch_size "
                               f"{config.max_batch_size} (config.pbtxt)")
        batching[entry.name] = BatchingConfig(max_batch_size=limit, max_queue_delay_us=args.max_queue_delay_us,
                                              max_queue_size=args.max_queue_size, enabled=args.dynamic_batching,
                                              inline_below_us=args.inline_below_us)
    return configs, batching


@dataclass
class Plan:
    """What the flags and the repository say to serve, checked before anything binds."""
    manifest: Manifest
    served: list[ModelEntry]
    typed_model: ModelEntry
    limits: Limits
    configs: dict
    batching: dict
    tls: TlsConfig | None
    token: str | None


_INSTALL_HINT = {"onnx": "install requirements-serving.txt",
                 "torchscript": "install requirements-serving-torchscript.txt or use the serving-torchscript image"}


def _servable(entries: list[ModelEntry], explicit: str | None) -> list[ModelEntry]:
    """The entries this installation can load: a model whose backend's package is missing (torch in the ONNX-only
    serving image) is skipped with one log line, or refused when the flags asked for it by name or format."""
    servable = []
    for entry in entries:
        if backend_available(entry.kind):
            servable.append(entry)
            continue
        package = REQUIRED_MODULE[entry.kind]
        hint = _INSTALL_HINT[entry.kind]
        if explicit:
            raise StartupError(f"model {entry.name!r} needs {package}, which this installation lacks ({hint})")
        log_event(logger, logging.WARNING, "model_skipped", model=entry.name, backend=entry.kind,
                  reason=f"{package} is not installed", hint=hint)
    if not servable:
        raise StartupError("no model of the repository can be served by this installation (it lacks "
                           + ", ".join(sorted({REQUIRED_MODULE[e.kind] for e in entries})) + ")")
    return servable


def _log_typed_model(entry: ModelEntry, manifest: Manifest, requested: str) -> None:
    """Say which model and precision the typed API serves, and warn when an INT8 model answers with the FP32
    graph's temperature and threshold (a repository exported before INT8 had its own)."""
    calibration = manifest.calibration(entry.name)
    log_event(logger, logging.INFO, "typed_model", model=entry.name, precision=entry.precision,
              requested_precision=requested, calibrated_precision=calibration.precision or None,
              temperature=calibration.temperature, threshold=calibration.threshold)
    if calibration.precision and calibration.precision != entry.precision:
        log_event(logger, logging.WARNING, "calibration_not_own", model=entry.name, precision=entry.precision,
                  calibrated_precision=calibration.precision,
                  detail=f"its probabilities and not-a-digit decisions use the {calibration.precision.upper()} "
                         "graph's temperature and threshold; re-export with --int8 to fit its own")


def make_plan(args: argparse.Namespace) -> Plan:
    """Step 1: read the repository, the model configs, TLS files and token; StartupError on any defect."""
    try:
        manifest = read_manifest(args.model_repository)
        precision = choose_precision(args.precision, manifest, args.model, args.backend, args.device)
        served = _servable(manifest.served(args.model, args.backend, precision), explicit=args.model or args.backend)
        for entry in served:
            verify_sha256(entry)
        configs, batching = _batching(args, served, manifest)
    except OSError as exc:  # e.g. a repository the server's user may not read (wrong owner, mode 0700)
        raise StartupError(f"{exc.filename or args.model_repository}: cannot read the model repository "
                           f"({exc.strerror or exc})") from None
    typed_model = manifest.select(args.model, args.backend, precision)
    _log_typed_model(typed_model, manifest, args.precision)
    return Plan(manifest=manifest, served=served, typed_model=typed_model if typed_model in served else served[0],
                 limits=Limits(args.max_images_per_request, args.max_message_bytes, args.max_image_pixels,
                               args.max_request_pixels),
                 configs=configs, batching=batching,
                 tls=TlsConfig.from_args(args.tls_cert, args.tls_key, args.tls_client_ca),
                 token=read_token(args.auth_token, args.auth_token_file))
