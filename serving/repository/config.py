"""config.pbtxt: a model's Triton ModelConfig, built as the protobuf message and written / read with text_format.

    config = model_config(KINDS["onnx"], max_batch_size=256, num_classes=10, embedding_dim=128)
    write_config(REPO / "lsoftmax_mnist_onnx", config)     # what `python -m export` writes
    config = read_config(path, into=mc.ModelConfig())      # StartupError naming the file when unreadable

The message is inference.ModelConfig of protos/inference/model_config.proto (a subset of Triton's schema, same
field numbers). Its generated stub (serving/_proto/inference/model_config_pb2) registers `inference.*` in
protobuf's default pool, where tritonclient's copy of Triton's protos clashes with it; so by default this
module builds messages of the same schema from a private descriptor pool (`message_type()`), which export,
bench and tests may use beside tritonclient. The server, which answers KServe with the stub's messages,
passes `into=` a stub message. The text is the same either way.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from serving.core.errors import StartupError
from serving.repository.format import (CONFIG_FILE, IMAGE_DIMS, INPUT, OUTPUT_EMBEDDING, OUTPUT_KNOWN_SCORE,
                                       OUTPUT_LOGITS, ModelFormat)

__all__ = ["PREFERRED_BATCH_SIZES", "MAX_QUEUE_DELAY_US", "message_type", "model_config", "config_text",
           "write_config", "read_config"]

PREFERRED_BATCH_SIZES = (8, 32, 64)  # dynamic_batching.preferred_batch_size, those <= max_batch_size
MAX_QUEUE_DELAY_US = 200  # dynamic_batching.max_queue_delay_microseconds
_STUB = Path(__file__).resolve().parents[1] / "_proto" / "inference" / "model_config_pb2.py"


@functools.cache
def message_type() -> type[Message]:
    """inference.ModelConfig from a private descriptor pool (the stub's own serialized schema, read from its
    source without importing it, so the default pool stays free for tritonclient)."""
    calls = [node for node in ast.walk(ast.parse(_STUB.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"]
    if len(calls) != 1:
        raise RuntimeError(f"{_STUB}: expected one AddSerializedFile(...) call, found {len(calls)}; "
                           "regenerate the stubs with `make protos`")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(ast.literal_eval(calls[0].args[0]))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def model_config(fmt: ModelFormat, max_batch_size: int, num_classes: int, embedding_dim: int, *,
                 name: str | None = None, input_name: str = INPUT, scheduling: bool = True,
                 into: Message | None = None, parameters: dict[str, str] | None = None,
                 known_score: bool = True) -> Message:
    """The ModelConfig of one of the repository's models (`into`, filled in, or a new private-pool message).

    max_batch_size > 0, so dims exclude the batch axis. scheduling: dynamic batching (PREFERRED_BATCH_SIZES up
    to max_batch_size, MAX_QUEUE_DELAY_US) and one instance of kind KIND_AUTO, as export writes; False: the
    interface only (what the server derives for a repository without config.pbtxt). parameters: Triton's
    ModelConfig.parameters (string values), written in key order (export: temperature, detector, threshold).
    known_score: the graph's third output (graphs exported with an open-set score); False for older graphs."""
    config = into if into is not None else message_type()()
    config.name = name or fmt.directory
    config.backend = fmt.backend
    config.max_batch_size = max_batch_size
    config.input.add(name=input_name, data_type="TYPE_UINT8", dims=IMAGE_DIMS)
    config.output.add(name=OUTPUT_LOGITS, data_type="TYPE_FP32", dims=[num_classes])
    config.output.add(name=OUTPUT_EMBEDDING, data_type="TYPE_FP32", dims=[embedding_dim])
    if known_score:  # [batch]: Triton wants dims [1] with an empty reshape for a tensor of one value per image
        config.output.add(name=OUTPUT_KNOWN_SCORE, data_type="TYPE_FP32", dims=[1]).reshape.SetInParent()
    if scheduling:
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(b for b in PREFERRED_BATCH_SIZES if b <= max_batch_size)
        batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
        config.instance_group.add(kind="KIND_AUTO", count=1)
    for key in sorted(parameters or {}):
        config.parameters[key].string_value = str(parameters[key])
    return config


def config_text(config: Message) -> str:
    """protobuf text format, as Triton reads config.pbtxt."""
    return text_format.MessageToString(config, use_short_repeated_primitives=True, use_index_order=True)


def write_config(model_dir: str | Path, config: Message) -> Path:
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(config_text(config))
    return path


def read_config(path: str | Path, into: Message | None = None) -> Message:
    """Parse a config.pbtxt (fields outside the schema are skipped); StartupError naming the file otherwise."""
    config = into if into is not None else message_type()()
    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), config, allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise StartupError(f"{path}: not a readable Triton model configuration ({exc})") from None
