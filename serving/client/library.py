"""The client library of lsoftmax.v1.DigitService: Client, Classification, image conversion, preprocess.

Import it as `serving.client` (the package re-exports everything here; its docstring shows the usage).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.client.security import bearer_metadata, client_channel

__all__ = ["Client", "Classification", "DEFAULT_ADDRESS", "FIT_CHOICES", "INVERT_CHOICES", "image_messages",
           "ordered_map", "preprocess"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
INVERT_CHOICES = ("auto", "never", "always")
FIT_CHOICES = ("auto", "digit", "resize")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Classification:
    label: int
    probability: float
    top_k: list[tuple[int, float]]
    logits: np.ndarray | None = None
    model_input: np.ndarray | None = None  # uint8 [28, 28] the model was fed (return_inputs=True)
    rejected: bool = False  # not a digit: known_score below the repository's threshold
    known_score: float = 0.0  # the graph's open-set score, higher = more digit-like (0: the graph has none)


def _array_images(array: np.ndarray) -> list[pb.Image]:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (MNIST polarity), got {array.dtype}")
    if array.shape in ((28, 28), (784,), (1, 28, 28)):
        array = array.reshape(1, 784)
    elif array.ndim == 2 and array.shape[1] == 784 or array.ndim == 3 and array.shape[1:] == (28, 28) \
            or array.ndim == 4 and array.shape[1:] == (1, 28, 28):
        array = array.reshape(len(array), 784)
    else:
        raise ValueError(f"image array of shape {list(array.shape)}; expected [28,28], [784] or a batch "
                         "[N,28,28], [N,784], [N,1,28,28]")
    array = np.ascontiguousarray(array)
    return [pb.Image(pixels=row.tobytes()) for row in array]


def image_messages(images) -> list[pb.Image]:
    """Paths, encoded bytes, uint8 arrays (one image or a batch), or a list of those → pb.Image list."""
    if isinstance(images, np.ndarray):
        return _array_images(images)
    if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike)):
        images = [images]
    messages = []
    for image in images:
        if isinstance(image, pb.Image):
            messages.append(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            messages.append(pb.Image(encoded=bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                messages.append(pb.Image(encoded=f.read()))
        elif isinstance(image, np.ndarray):
            messages.extend(_array_images(image))
        else:
            raise TypeError(f"cannot send {type(image).__name__} as an image; use a path, bytes or a uint8 array")
    return messages


def preprocess(image, *, invert: str = "auto", fit: str = "auto") -> np.ndarray:
    """An encoded image (bytes or a path) → uint8 [1, 28, 28], exactly what the typed API feeds the model for it
    (serving.images.decoding: the same decoding, polarity and MNIST framing). For KServe / tritonclient users, whose
    `image` input takes uint8 [N, 1, 28, 28]: preprocess on the client, then stack. Raises
    serving.core.errors.ImageError for an image the server would refuse with INVALID_ARGUMENT."""
    from serving.images.decoding import Fit, Invert, decode_image

    if invert not in INVERT_CHOICES or fit not in FIT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES} and fit one of {FIT_CHOICES}")
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    return decode_image(0, bytes(image), Invert[invert.upper()], Fit[fit.upper()])[None]


def _options(invert: str, fit: str) -> pb.ImageOptions:
    if invert not in INVERT_CHOICES or fit not in FIT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES} and fit one of {FIT_CHOICES}")
    return pb.ImageOptions(invert=pb.Invert.Value(f"INVERT_{invert.upper()}"), fit=pb.Fit.Value(f"FIT_{fit.upper()}"))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int = 4,
                on_result: Callable[[T, R], None] | None = None) -> Iterator[R]:
    """fn over items in `concurrency` threads with at most 2 x concurrency calls pending; yields results in
    input order (on_result is called as each one completes, in order). The first error cancels the rest."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="client") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                while len(pending) >= 2 * max(1, concurrency):
                    yield _finish(pending.popleft(), on_result)
            while pending:
                yield _finish(pending.popleft(), on_result)
        finally:
            for _, future in pending:
                future.cancel()


def _finish(entry, on_result):
    item, future = entry
    result = future.result()
    if on_result is not None:
        on_result(item, result)
    return result


class Client:
    """connections: TCP connections to each server address, calls taking them in turn (a retry takes the next). A
    server started with --workers N has the kernel hand each new connection to one of its N processes, so a client
    reaches all of them only through several connections (N or more; which worker gets which is the kernel's
    choice). Each connection is a channel with its own subchannel pool: gRPC would otherwise share one connection
    between channels to the same target with the same options."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = 30.0, retries: int = 5,
                 initial_backoff: float = 0.1, max_backoff: float = 2.0,
                 max_receive_bytes: int = 256 * 1024 * 1024, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None, connections: int = 1) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._metadata = bearer_metadata(token)
        options = [("grpc.max_receive_message_length", max_receive_bytes), ("grpc.max_send_message_length", -1)]
        if connections > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channels = [client_channel(address, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                         tls_server_name=tls_server_name, options=options)
                          for _ in range(connections)]
        self._stubs = [pb_grpc.DigitServiceStub(channel) for channel in self._channels]
        self._turns = itertools.count()  # next() is atomic: threads of ordered_map share it

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rpc(self, method: str) -> Callable:
        """The unary `method` on the next connection each time it is called: calls and their retries take the
        connections in turn."""
        def call(request, timeout: float, metadata):
            stub = self._stubs[next(self._turns) % len(self._stubs)]
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
        return call

    def _call(self, rpc, request, timeout: float | None):
        """One unary call with an overall deadline, retried on UNAVAILABLE with jittered exponential backoff."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return rpc(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                delay = min(self.max_backoff, self.initial_backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                attempt += 1

    def classify(self, images, *, top_k: int = 1, return_logits: bool = False, return_inputs: bool = False,
                 invert: str = "auto", fit: str = "auto", timeout: float | None = None) -> list[Classification]:
        """One request; returns one Classification per image, in order. return_inputs: each carries the
        uint8 [28, 28] the model was fed (`model_input`), to see what the preprocessing made of an image."""
        request = pb.ClassifyRequest(images=image_messages(images), top_k=top_k, return_logits=return_logits,
                                     return_inputs=return_inputs, options=_options(invert, fit))
        response = self._call(self._rpc("Classify"), request, timeout)
        return [Classification(label=r.label, probability=r.probability,
                               top_k=[(s.label, s.probability) for s in r.top_k],
                               logits=np.asarray(r.logits, np.float32) if return_logits else None,
                               model_input=np.frombuffer(r.model_input, np.uint8).reshape(28, 28)
                               if return_inputs and len(r.model_input) == 784 else None,
                               rejected=r.rejected, known_score=r.known_score)
                for r in response.results]

    def embed(self, images, *, l2_normalize: bool = False, invert: str = "auto", fit: str = "auto",
              timeout: float | None = None) -> np.ndarray:
        """One request; returns float32 [N, D]."""
        request = pb.EmbedRequest(images=image_messages(images), l2_normalize=l2_normalize,
                                  options=_options(invert, fit))
        response = self._call(self._rpc("Embed"), request, timeout)
        if not response.embeddings:
            return np.zeros((0, response.dim), np.float32)
        return np.asarray([e.values for e in response.embeddings], np.float32).reshape(-1, response.dim)

    def info(self, timeout: float | None = None) -> dict:
        """GetModelInfo as a dict (proto field names), with the manifest parsed under "manifest"."""
        response = self._call(self._rpc("GetModelInfo"), pb.GetModelInfoRequest(), timeout)
        info = json_format.MessageToDict(response, preserving_proto_field_name=True)
        info["manifest"] = json.loads(info.pop("manifest_json", "{}"))
        return info

    def wait_until_serving(self, timeout: float = 30.0, service: str = "") -> None:
        """Poll grpc.health.v1 until `service` is SERVING on every connection; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        waiting = [health_pb2_grpc.HealthStub(channel) for channel in self._channels]
        while time.monotonic() < deadline:
            try:
                reply = waiting[0].Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    waiting.pop(0)
                    if not waiting:
                        return
                    continue
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.05)
        raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f} s (last: {last})")

    @staticmethod
    def _batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        if images.ndim == 2 and images.shape[1] == 784 or images.ndim == 4 and images.shape[1:] == (1, 28, 28):
            images = images.reshape(len(images), 28, 28)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"expected a batch [N,28,28], [N,784] or [N,1,28,28], got {list(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]

    def classify_array(self, images: np.ndarray, *, batch_size: int = 256, concurrency: int = 4,
                       progress: Callable[[int], None] | None = None,
                       with_rejected: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 [N,28,28] (or [N,784], [N,1,28,28]) → (labels int64 [N], probabilities float32 [N]), and with
        with_rejected also rejected bool [N]; sent in batches with `concurrency` requests in flight; progress(n) is
        called per finished batch."""
        labels, probabilities, rejected = [], [], []
        done = (lambda batch, _: progress(len(batch))) if progress else None
        for results in ordered_map(self.classify, self._batches(images, batch_size), concurrency, done):
            labels.extend(r.label for r in results)
            probabilities.extend(r.probability for r in results)
            rejected.extend(r.rejected for r in results)
        out = (np.asarray(labels, np.int64), np.asarray(probabilities, np.float32))
        return (*out, np.asarray(rejected, bool)) if with_rejected else out

    def embed_array(self, images: np.ndarray, *, batch_size: int = 256, concurrency: int = 4,
                    l2_normalize: bool = False, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """uint8 [N,28,28] (or [N,784], [N,1,28,28]) → float32 [N, D], batched like classify_array."""
        done = (lambda batch, _: progress(len(batch))) if progress else None
        embed = lambda batch: self.embed(batch, l2_normalize=l2_normalize)  # noqa: E731
        parts = list(ordered_map(embed, self._batches(images, batch_size), concurrency, done))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

