from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Invert(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVERT_AUTO: _ClassVar[Invert]
    INVERT_NEVER: _ClassVar[Invert]
    INVERT_ALWAYS: _ClassVar[Invert]

class Fit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIT_AUTO: _ClassVar[Fit]
    FIT_DIGIT: _ClassVar[Fit]
    FIT_RESIZE: _ClassVar[Fit]
INVERT_AUTO: Invert
INVERT_NEVER: Invert
INVERT_ALWAYS: Invert
FIT_AUTO: Fit
FIT_DIGIT: Fit
FIT_RESIZE: Fit

class Image(_message.Message):
    __slots__ = ("encoded", "pixels")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pixels: bytes
    def __init__(self, encoded: _Optional[bytes] = ..., pixels: _Optional[bytes] = ...) -> None: ...

class ImageOptions(_message.Message):
    __slots__ = ("invert", "fit")
    INVERT_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    invert: Invert
    fit: Fit
    def __init__(self, invert: _Optional[_Union[Invert, str]] = ..., fit: _Optional[_Union[Fit, str]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "top_k", "return_logits", "options", "return_inputs")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    return_logits: bool
    options: ImageOptions
    return_inputs: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., return_logits: _Optional[bool] = ..., options: _Optional[_Union[ImageOptions, _Mapping]] = ..., return_inputs: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: int
    probability: float
    def __init__(self, label: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("label", "probability", "top_k", "logits", "rejected", "known_score", "model_input")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    KNOWN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    label: int
    probability: float
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    logits: _containers.RepeatedScalarFieldContainer[float]
    rejected: bool
    known_score: float
    model_input: bytes
    def __init__(self, label: _Optional[int] = ..., probability: _Optional[float] = ..., top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., logits: _Optional[_Iterable[float]] = ..., rejected: _Optional[bool] = ..., known_score: _Optional[float] = ..., model_input: _Optional[bytes] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model_name", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model_name: str
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "l2_normalize", "options")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    L2_NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    l2_normalize: bool
    options: ImageOptions
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., l2_normalize: _Optional[bool] = ..., options: _Optional[_Union[ImageOptions, _Mapping]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "model_name", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    model_name: str
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "net", "margin", "num_classes", "embedding_dim", "test_accuracy", "model_sha256", "backend", "device", "onnx_providers", "max_images_per_request", "max_message_bytes", "manifest_json", "dynamic_batching", "max_batch_size", "max_queue_delay_us", "max_queue_size", "temperature", "known_score_detector", "known_score_threshold", "precision", "calibrated_precision")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NET_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ONNX_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_SCORE_DETECTOR_FIELD_NUMBER: _ClassVar[int]
    KNOWN_SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    net: str
    margin: int
    num_classes: int
    embedding_dim: int
    test_accuracy: float
    model_sha256: str
    backend: str
    device: str
    onnx_providers: _containers.RepeatedScalarFieldContainer[str]
    max_images_per_request: int
    max_message_bytes: int
    manifest_json: str
    dynamic_batching: bool
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    temperature: float
    known_score_detector: str
    known_score_threshold: float
    precision: str
    calibrated_precision: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., net: _Optional[str] = ..., margin: _Optional[int] = ..., num_classes: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., model_sha256: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., onnx_providers: _Optional[_Iterable[str]] = ..., max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., manifest_json: _Optional[str] = ..., dynamic_batching: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., temperature: _Optional[float] = ..., known_score_detector: _Optional[str] = ..., known_score_threshold: _Optional[float] = ..., precision: _Optional[str] = ..., calibrated_precision: _Optional[str] = ...) -> None: ...
