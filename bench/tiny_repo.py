"""A tiny model repository in the export layout: an ONNX graph that is one matmul (uint8 image → 16-D embedding
→ 10 logits) with the exported graphs' interface. Its in-process limit is far above the server's, so serving
it measures per-request overhead, as the peer comparisons in BENCHMARKS.md do. Written through serving's
repository format (serving.repository_*), like `python -m export`'s repositories.

    python bench/loadgen.py tiny-repo OUT
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.repository.format import BY_KIND, IMAGE_DIMS, INPUT, OUTPUT_EMBEDDING, OUTPUT_LOGITS

__all__ = ["tiny_repo"]


def _tiny_graph(num_classes: int, embedding_dim: int):
    """uint8 image → float → flatten → embedding (MatMul) → logits (MatMul), with the exported graphs' names."""
    from onnx import TensorProto, helper, numpy_helper

    pixels = int(np.prod(IMAGE_DIMS))
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((pixels, embedding_dim)) / pixels).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((embedding_dim, num_classes)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([-1, pixels], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Cast", [INPUT], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w1"], [OUTPUT_EMBEDDING]),
         helper.make_node("MatMul", [OUTPUT_EMBEDDING, "w2"], [OUTPUT_LOGITS])],
        "tiny", [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", *IMAGE_DIMS])],
        [helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["N", num_classes]),
         helper.make_tensor_value_info(OUTPUT_EMBEDDING, TensorProto.FLOAT, ["N", embedding_dim])],
        initializer=[w1, w2, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_repo(out: Path, max_batch_size: int = 256) -> Path:
    """A linear ONNX model with the exported graphs' interface, written as a model repository."""
    import onnx

    from serving.repository.reader import file_sha256
    from serving.repository.config import model_config, write_config
    from serving.repository.manifest import ModelSpec, RepositoryManifest, write_manifest

    num_classes, embedding_dim, fmt = 10, 16, BY_KIND["onnx"]
    path = out / fmt.file()
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_tiny_graph(num_classes, embedding_dim), str(path))
    write_config(out / fmt.directory, model_config(fmt, max_batch_size, num_classes, embedding_dim, scheduling=False,
                                                   known_score=False))
    write_manifest(out, RepositoryManifest(
        net="tiny-linear", margin=1, num_classes=num_classes, embedding_dim=embedding_dim,
        max_batch_size=max_batch_size, models={fmt.directory: ModelSpec.of(fmt, file_sha256(path))}))
    return out
