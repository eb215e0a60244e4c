"""Triton's ModelConfig for each served model: REPO/<model>/config.pbtxt as written, and as this server runs it.

    base = read_model_config(entry, manifest)              # StartupError on a malformed config.pbtxt
    base.max_batch_size                                     # the default for --max-batch-size
    effective_config(base, entry, "cpu", batching)          # what KServe ModelConfig answers

config.pbtxt is protobuf text format of Triton's ModelConfig (serving/_proto/inference/model_config_pb2, a
subset of Triton's schema with the same field numbers), parsed by serving.repository.config; fields outside
the subset are skipped. A repository without config.pbtxt gets one derived from manifest.json (the same
builder export writes with, without the scheduling part). The effective config reports the batching the
server was started with (max_batch_size, max_queue_delay_microseconds, default_queue_policy.max_queue_size,
or no dynamic_batching with --no-dynamic-batching), one instance on the device in use, and Triton's platform
name. Imports the inference.* stubs: used by the server only, never by code the test process imports.
"""

from __future__ import annotations

from serving._proto.inference import model_config_pb2 as mc
from serving.backends.batching import BatchingConfig
from serving.core.errors import StartupError
from serving.repository.reader import Manifest, ModelEntry
from serving.repository.config import model_config, read_config
from serving.repository.format import CONFIG_FILE, OUTPUT_KNOWN_SCORE

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "read_model_config", "effective_config"]

DEFAULT_MAX_BATCH_SIZE = 256


def _derived(entry: ModelEntry, manifest: Manifest) -> mc.ModelConfig:
    known_score = any(o.name == OUTPUT_KNOWN_SCORE for o in manifest.spec.outputs or ())
    return model_config(entry.format, manifest.max_batch_size or DEFAULT_MAX_BATCH_SIZE, manifest.num_classes,
                        manifest.embedding_dim, name=entry.name, input_name=manifest.input_name, scheduling=False,
                        into=mc.ModelConfig(), known_score=known_score)


def read_model_config(entry: ModelEntry, manifest: Manifest) -> mc.ModelConfig:
    """Parse the model's config.pbtxt (next to its version folders); derive one when there is none."""
    path = entry.path.parent.parent / CONFIG_FILE
    if not path.is_file():
        return _derived(entry, manifest)
    config = read_config(path, into=mc.ModelConfig())
    if config.name and config.name != entry.name:
        raise StartupError(f"{path}: name {config.name!r} differs from the model directory {entry.name!r}")
    if config.max_batch_size < 0:
        raise StartupError(f"{path}: max_batch_size must be >= 0, got {config.max_batch_size}")
    if not config.max_batch_size:  # 0: the model takes no batch axis, which these graphs always have
        config.max_batch_size = manifest.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    config.name = entry.name
    return config


def effective_config(base: mc.ModelConfig, entry: ModelEntry, device: str,
                     batching: BatchingConfig) -> mc.ModelConfig:
    config = mc.ModelConfig()
    config.CopyFrom(base)
    config.platform = entry.format.platform
    config.default_model_filename = entry.path.name
    config.max_batch_size = batching.max_batch_size
    gpu = device.startswith("cuda")
    del config.instance_group[:]
    config.instance_group.add(name=f"{entry.name}_0", count=1,
                              kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
                              gpus=[int(device.partition(":")[2] or 0)] if gpu else [])
    if batching.enabled:
        preferred = [b for b in config.dynamic_batching.preferred_batch_size if b <= batching.max_batch_size]
        config.dynamic_batching.Clear()
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    else:
        config.ClearField("dynamic_batching")
    return config
