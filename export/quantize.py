"""INT8: a statically quantised copy of the verified FP32 ONNX graph, and the bounds it must meet to ship.

`python -m export ... --int8` runs onnxruntime's quantize_static on the FP32 model.onnx the export has just
verified: QDQ format, per-channel int8 weights, uint8 activations with MinMax ranges calibrated on the images the
temperature is fitted on (the checkpoint's held-out training images, never the test set, which verifies). Then
the INT8 graph is compared with the FP32 one on the verification images; a broken bound fails the export.

What is quantised, and how, is measured, not guessed (BENCHMARKS.md, "INT8"):
- Conv nodes with more than one input channel. The image-facing conv (one input channel) is about 1% of the
  multiply-adds, yet quantising it cost the most fidelity (minimum embedding cosine 0.90 with it, 0.995 without;
  accept/reject agreement 72%).
- uint8 activations, not int8: on x86 onnxruntime fuses a QDQ Conv into QLinearConv only with uint8 activations,
  and its int8 -> uint8 rewrite skipped the Q/DQ pairs that feed both a conv and a known_score tap, so with int8
  only 2 of the 4 convs fused (the other two ran float between Q/DQ: pure overhead).
- MaxPool too, so the pools run on uint8 (NhwcMaxPool) between the fused convs.
- PRelu is rewritten first as Max(x, a*x), exactly equal for every slope a <= 1 (rounding is monotone):
  onnxruntime's PRelu kernel took ~13x the time of Mul + Max on this CPU, and has no quantised kernel either way.
The embedding MatMul, the classifier and the known_score subgraph stay float: they are a sliver of the work.
The quantised convs still move the scores a little, so the INT8 graph gets its own temperature and threshold,
fitted on the same held-out images as the FP32 graph's (export.int8_fit), and its accept/reject decisions are
compared with FP32's each at its own threshold.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from serving.repository.format import ALL_OUTPUTS, INPUT

__all__ = ["Int8Error", "BOUNDS", "quantizable_nodes", "prelu_as_max", "quantize", "run_graph", "compare",
           "int8_problems", "build_int8"]


class Int8Error(RuntimeError):
    """The INT8 graph could not be made, or it breaks a bound against the FP32 graph."""


# The INT8 targets, enforced: top-1 agreement with FP32 (%), accuracy drop (points), mean cosine of the
# INT8 embedding to the FP32 one, and agreement of the accept/reject decision, each graph at its own threshold (%).
BOUNDS = {"min_top1_agreement": 99.8, "max_accuracy_drop": 0.1, "min_embedding_cosine": 0.995,
          "min_decision_agreement": 99.0}
CALIBRATION_BATCH = 500
# 7-bit weights (onnxruntime's advice for U8S8 without VNNI): this AVX2 CPU's u8 x s8 kernel sums pairs in int16,
# which full-range weights can saturate. With 8-bit weights the briefly trained test checkpoint's accept/reject
# agreement fell to 97.7% (bound 99%); with 7-bit it passes. The real m=4 model passes either way (99.61% / 99.35%).
REDUCE_RANGE = True
QUANTIZED_OP_TYPES = ("Conv", "MaxPool")  # the convs quantizable_nodes picks, and every MaxPool


def quantizable_nodes(model) -> list[str]:
    """The Conv nodes worth quantising: those whose weight has more than one input channel (see the module's
    docstring for why the image-facing conv stays float). The MaxPool nodes are quantised with them."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "Conv" and len(shapes.get(node.input[1], ())) == 4 and shapes[node.input[1]][1] > 1]


def prelu_as_max(model):
    """A copy of the graph with each PRelu(x, a) whose constant slopes are all <= 1 written as Max(x, Mul(x, a)):
    the same values (for a <= 1, a*x <= x when x >= 0 and a*x >= x when x < 0, and rounding keeps the order), in
    two vectorised kernels instead of onnxruntime's slow PRelu. Other PRelu nodes are kept."""
    import copy

    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    slopes = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        slope = slopes.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if slope is not None and bool((slope <= 1).all()):
            scaled = node.output[0] + "_ax"
            nodes += [helper.make_node("Mul", [node.input[0], node.input[1]], [scaled], name=node.name + "_mul"),
                      helper.make_node("Max", [node.input[0], scaled], [node.output[0]], name=node.name + "_max")]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@contextmanager
def _quiet_root_logger():
    """quantize_static logs its advice ("consider pre-processing") on the root logger; the export prints its own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> list[str]:
    """Write the INT8 graph of fp32_path to int8_path; returns the names of the quantised Conv nodes (the MaxPool
    nodes are quantised too)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(range(0, len(calibration_images), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self._next, None)
            return None if start is None else {INPUT: calibration_images[start:start + CALIBRATION_BATCH]}

    model = onnx.load(str(fp32_path))
    nodes = quantizable_nodes(model)
    if not nodes:
        raise Int8Error(f"{fp32_path}: no Conv node with more than one input channel to quantise")
    pools = [node.name for node in model.graph.node if node.op_type == "MaxPool"]
    rewritten = Path(int8_path).with_name(Path(int8_path).stem + ".prelu_as_max.onnx")
    onnx.save(prelu_as_max(model), str(rewritten))
    try:
        with _quiet_root_logger():
            quantize_static(str(rewritten), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE,
                            op_types_to_quantize=list(QUANTIZED_OP_TYPES), nodes_to_quantize=nodes + pools,
                            extra_options={"CalibMaxIntermediateOutputs": 4})  # ranges merged every 4 batches
    finally:
        rewritten.unlink(missing_ok=True)
    return nodes


def run_graph(path: Path, images: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    """The ONNX graph's outputs on uint8 images, in ALL_OUTPUTS order (those the graph has)."""
    from export.graphs import load_onnx_session

    session = load_onnx_session(path)
    names = [o.name for o in session.get_outputs() if o.name in ALL_OUTPUTS]
    parts = [session.run(names, {INPUT: images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray | None,
            threshold: float | None, int8_threshold: float | None = None) -> dict:
    """The INT8 graph against the FP32 one on the same images: top-1 agreement, accuracy of both, embedding
    cosine, known_score difference, and each graph's accept/reject decision at its own threshold (FP32's
    `threshold`, INT8's `int8_threshold`, FP32's when None): their agreement, the share of images each accepts,
    and the agreement had INT8 kept FP32's threshold (None where not applicable)."""
    ref, got = run_graph(fp32_path, images), run_graph(int8_path, images)
    cosine = (ref[1] * got[1]).sum(1) / np.maximum(np.linalg.norm(ref[1], axis=1) * np.linalg.norm(got[1], axis=1),
                                                   1e-12)
    record = {"images": len(images), "top1_agreement": 100.0 * float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
              "accuracy": None, "embedding_cosine_mean": float(cosine.mean()),
              "embedding_cosine_min": float(cosine.min()), "known_score_max_abs_diff": None,
              "known_score_scale": None, "threshold": threshold, "int8_threshold": int8_threshold,
              "decision_agreement": None, "decision_agreement_at_fp32_threshold": None, "accepted": None}
    if labels is not None:
        record["accuracy"] = {name: 100.0 * float((out[0].argmax(1) == labels).mean())
                              for name, out in (("fp32", ref), ("int8", got))}
    if len(ref) > 2 and len(got) > 2:
        record["known_score_max_abs_diff"] = float(np.abs(ref[2] - got[2]).max())
        record["known_score_scale"] = float(np.abs(ref[2]).max())
        if threshold is not None:
            fp32_accepts = ref[2] >= threshold
            int8_accepts = got[2] >= (threshold if int8_threshold is None else int8_threshold)
            record["decision_agreement"] = 100.0 * float((fp32_accepts == int8_accepts).mean())
            record["decision_agreement_at_fp32_threshold"] = 100.0 * float((fp32_accepts == (got[2] >= threshold))
                                                                           .mean())
            record["accepted"] = {"fp32": 100.0 * float(fp32_accepts.mean()),
                                  "int8": 100.0 * float(int8_accepts.mean())}
    return record


def int8_problems(record: dict, bounds: dict = BOUNDS) -> list[str]:
    """Each broken bound as one phrase (empty when the INT8 graph may ship)."""
    problems = []
    if record["top1_agreement"] < bounds["min_top1_agreement"]:
        problems.append(f"top-1 agreement with FP32 {record['top1_agreement']:.2f}% < {bounds['min_top1_agreement']}%")
    accuracy = record.get("accuracy")
    if accuracy and accuracy["fp32"] - accuracy["int8"] > bounds["max_accuracy_drop"] + 1e-9:
        problems.append(f"accuracy {accuracy['int8']:.2f}% is more than {bounds['max_accuracy_drop']} points below "
                        f"FP32's {accuracy['fp32']:.2f}%")
    if not record["embedding_cosine_mean"] >= bounds["min_embedding_cosine"]:  # NaN fails too
        problems.append(f"mean embedding cosine to FP32 {record['embedding_cosine_mean']:.4f} < "
                        f"{bounds['min_embedding_cosine']}")
    agreement = record.get("decision_agreement")
    if agreement is not None and agreement < bounds["min_decision_agreement"]:
        own = record.get("int8_threshold")
        at = f"threshold {record['threshold']:.6g}" + (f" (INT8 at its own {own:.6g})" if own is not None else "")
        problems.append(f"accept/reject at {at} agrees with FP32 on {agreement:.2f}% "
                        f"< {bounds['min_decision_agreement']}%")
    return problems


def build_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray, calibration_labels: np.ndarray,
               calibrated_on: dict, images: np.ndarray, labels: np.ndarray | None,
               fp32_fits: dict) -> tuple[dict, dict]:
    """Quantise, fit the INT8 graph's own temperature and threshold on the calibration images (export.int8_fit),
    verify; returns the manifest's `int8` record and the INT8 model's model_calibration entry. Int8Error naming
    every broken bound. fp32_fits: the manifest's calibration and open_set records (the FP32 graph's fit)."""
    from export.int8_fit import fit_int8

    nodes = quantize(fp32_path, int8_path, calibration_images)
    own = fit_int8(int8_path, calibration_images, calibration_labels, fp32_fits)
    record = compare(fp32_path, int8_path, images, labels, fp32_fits["open_set"].get("threshold"),
                     own["open_set"]["threshold"])
    problems = int8_problems(record)
    if problems:
        raise Int8Error("the INT8 graph fails verification: " + "; ".join(problems))
    import onnx

    op_types = sorted({node.op_type for node in onnx.load(str(int8_path)).graph.node})
    return {"format": "QDQ", "weights": "int8, per channel", "activations": "uint8, MinMax ranges",
            "prelu": "Max(x, a*x) (exact for slopes <= 1)",
            "quantized_nodes": nodes, "op_types": op_types,
            "calibrated_on": {**calibrated_on, "images": len(calibration_images)},
            "verification": record, "bounds": dict(BOUNDS)}, own
