"""The model repository's vocabulary, owned here once: tensor names, the backend table, file names, format ids.

    from serving.repository.format import INPUT, OUTPUTS, FORMATS, BY_KIND, format_named
    fmt = format_named("onnx")          # or the manifest's "onnxruntime"
    fmt.backend, fmt.platform           # "onnxruntime", "onnxruntime_onnx" (Triton's names)
    fmt.directory, fmt.file()           # "lsoftmax_mnist_onnx", "lsoftmax_mnist_onnx/1/model.onnx"

Every graph of a repository takes INPUT (UINT8 [N, *IMAGE_DIMS]) and returns OUTPUTS (FP32 [N, C] and
[N, D]) in that order, then, in repositories exported with an open-set score, OUTPUT_KNOWN_SCORE (FP32 [N]). Writers (`python -m export`, bench/loadgen.py tiny-repo) and the server's reader
(serving.repository.reader, serving.repository.manifest, serving.repository.config) all take these from here.
Standard library only: export, bench and the tests import it beside tritonclient.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INPUT", "OUTPUT_LOGITS", "OUTPUT_EMBEDDING", "OUTPUT_KNOWN_SCORE", "OUTPUTS", "OPTIONAL_OUTPUTS",
           "ALL_OUTPUTS", "INPUT_DATATYPE", "OUTPUT_DATATYPE",
           "IMAGE_DIMS", "MODEL_PREFIX", "DEFAULT_VERSION", "MANIFEST_FILE", "CONFIG_FILE", "MANIFEST_FORMAT",
           "MANIFEST_VERSION", "ModelFormat", "FORMATS", "BY_KIND", "BY_BACKEND", "format_named", "ONNX_INT8_MODEL",
           "PRECISIONS", "precision_of", "MODEL_CALIBRATION"]

# Tensors (ONNX graph names, KServe tensor names, config.pbtxt input/output names).
INPUT = "image"
OUTPUT_LOGITS = "logits"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_KNOWN_SCORE = "known_score"  # FP32 [N], higher = more digit-like (open-set score; newer repositories)
OUTPUTS = (OUTPUT_LOGITS, OUTPUT_EMBEDDING)  # what every graph returns, first and in this order
OPTIONAL_OUTPUTS = (OUTPUT_KNOWN_SCORE,)  # what newer graphs return after them (older repositories lack it)
ALL_OUTPUTS = OUTPUTS + OPTIONAL_OUTPUTS  # the order of a backend's outputs when the graph has them all
INPUT_DATATYPE = "UINT8"  # KServe datatype names; config.pbtxt says TYPE_UINT8 / TYPE_FP32
OUTPUT_DATATYPE = "FP32"
IMAGE_DIMS = (1, 28, 28)  # one image, without the batch axis

# Layout: REPO/MANIFEST_FILE, REPO/<directory>/CONFIG_FILE, REPO/<directory>/<version>/<filename>.
MODEL_PREFIX = "lsoftmax_mnist"
DEFAULT_VERSION = "1"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
MANIFEST_FORMAT = "lsoftmax-serve/model-repository"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ModelFormat:
    """One graph format: our name for it and Triton's, and where a repository keeps it."""

    kind: str  # ours: --backend, bench --backends, parity reports
    backend: str  # Triton's backend: config.pbtxt `backend`, manifest.json models.<name>.backend
    platform: str  # Triton's platform: KServe ModelMetadata / ModelConfig answers
    filename: str  # the model file inside a version folder

    @property
    def directory(self) -> str:
        """The model's folder, which is also its model name (KServe, --model)."""
        return f"{MODEL_PREFIX}_{self.kind}"

    def file(self, version: str = DEFAULT_VERSION) -> str:
        """The model file relative to the repository root, as manifest.json records it."""
        return f"{self.directory}/{version}/{self.filename}"


FORMATS = (
    ModelFormat(kind="onnx", backend="onnxruntime", platform="onnxruntime_onnx", filename="model.onnx"),
    ModelFormat(kind="torchscript", backend="pytorch", platform="pytorch_libtorch", filename="model.pt"),
)
BY_KIND = {f.kind: f for f in FORMATS}
BY_BACKEND = {f.backend: f for f in FORMATS}
# The statically quantised ONNX graph (`python -m export --int8`): a second model of the onnx format (backend
# "onnxruntime", so it loads and serves like the FP32 one), told apart by its folder, i.e. its model name
# (`python -m serving --model lsoftmax_mnist_onnx_int8`). Not in FORMATS: a format is one per Triton backend. Which
# of the two ONNX models the typed API serves is --precision's choice (serving.precision: INT8 on the CPU).
ONNX_INT8_MODEL = f"{BY_KIND['onnx'].directory}_int8"
PRECISIONS = ("fp32", "int8")  # what a model computes in: every graph is FP32 but the quantised one
# manifest.json record {model name: {"calibration": {...}, "open_set": {...}}}: the temperature and known_score
# threshold fitted on that model's own graph (the INT8 one, in newer repositories); a model without an entry uses the
# repository's `calibration` and `open_set`, which were fitted on the FP32 graph.
MODEL_CALIBRATION = "model_calibration"


def precision_of(model_name: str) -> str:
    """"int8" for the quantised ONNX model, "fp32" for every other model of a repository."""
    return "int8" if model_name == ONNX_INT8_MODEL else "fp32"


def format_named(name: str) -> ModelFormat:
    """The format by our kind ("onnx") or Triton's backend ("onnxruntime"); KeyError naming both sets."""
    found = BY_KIND.get(name) or BY_BACKEND.get(name)
    if found is None:
        raise KeyError(f"unknown backend {name!r}; expected one of {', '.join([*BY_KIND, *BY_BACKEND])}")
    return found
