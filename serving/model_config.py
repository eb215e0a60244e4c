"""Triton's ModelConfig for each served model: REPO/<model>/config.pbtxt as written, and as this server runs it.

    base = read_model_config(entry, manifest)              # StartupError on a malformed config.pbtxt
    base.max_batch_size                                     # the default for --max-batch-size
    effective_config(base, entry, "cpu", batching)          # what KServe ModelConfig answers

config.pbtxt is protobuf text format of Triton's ModelConfig (serving/_proto/inference/model_config_pb2, a
subset of Triton's schema with the same field numbers); fields outside the subset are skipped. A repository
without config.pbtxt gets one derived from manifest.json. The effective config reports the batching the
server was started with (max_batch_size, max_queue_delay_microseconds, default_queue_policy.max_queue_size,
or no dynamic_batching with --no-dynamic-batching), one instance on the device in use, and Triton's platform
name. Imports the inference.* stubs: used by the server only, never by code the test process imports.
"""

from __future__ import annotations

from google.protobuf import text_format

from serving._proto.inference import model_config_pb2 as mc
from serving.batching import BatchingConfig
from serving.errors import StartupError
from serving.repository import Manifest, ModelEntry

__all__ = ["PLATFORMS", "DEFAULT_MAX_BATCH_SIZE", "read_model_config", "effective_config"]

PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}  # Triton's platform names
DEFAULT_MAX_BATCH_SIZE = 256


def _derived(entry: ModelEntry, manifest: Manifest) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=entry.name, backend=entry.backend, max_batch_size=manifest.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        input=[mc.ModelInput(name=manifest.input_name, data_type=mc.TYPE_UINT8, dims=[1, 28, 28])],
        output=[mc.ModelOutput(name="logits", data_type=mc.TYPE_FP32, dims=[manifest.num_classes]),
                mc.ModelOutput(name="embedding", data_type=mc.TYPE_FP32, dims=[manifest.embedding_dim])])


def read_model_config(entry: ModelEntry, manifest: Manifest) -> mc.ModelConfig:
    """Parse the model's config.pbtxt (next to its version folders); derive one when there is none."""
    path = entry.path.parent.parent / "config.pbtxt"
    if not path.is_file():
        return _derived(entry, manifest)
    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig(), allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise StartupError(f"{path}: not a readable Triton model configuration ({exc})") from None
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
    config.platform = PLATFORMS[entry.kind]
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
