"""Client of lsoftmax.v1.DigitService: the library (below), `python -m serving.client` (cli.py), and the
container health probe `python -m serving.client.probe` (probe.py; `python -m serving.probe` runs it too).

    from serving.client import Client
    with Client("127.0.0.1:50051") as client:
        client.wait_until_serving()
        results = client.classify(["three.png", open("seven.jpg", "rb").read()], top_k=3)
        results[0].label, results[0].probability, results[0].top_k
        vectors = client.embed(uint8_digits)                 # float32 [N, D]
        client.classify(["photo.jpg"], return_inputs=True)[0].model_input   # uint8 [28, 28] the model saw
    preprocess(open("photo.jpg", "rb").read())               # uint8 [1, 28, 28]: the typed API's preprocessing,
                                                             # for tritonclient / KServe users
        labels, probs = client.classify_array(uint8_digits)  # many images: batched, several requests in flight
        client.info()                                        # dict: model, backend, device, manifest facts

Secured servers (serving.client.security): `Client(address, tls_ca="ca.pem", token="...")` talks TLS, verifying
the server against ca.pem (tls=True alone: the system's roots), sends `authorization: Bearer <token>` with every
call, and presents tls_cert/tls_key to a server that requires client certificates (mutual TLS).
tls_server_name overrides the name checked against the certificate (e.g. when dialling an IP address).

Images are file paths, encoded bytes (PNG, JPEG, ... — the server decodes and fits them), or uint8 numpy
arrays in MNIST polarity (a [28,28] / [784] image, or a batch [N,28,28] / [N,784] / [N,1,28,28]) sent as
raw pixels. Every call has a deadline (`timeout`, default 30 s) and is retried on UNAVAILABLE (server
starting, restarting or briefly unreachable) with exponential backoff and jitter inside that deadline.
Other errors surface as grpc.RpcError with the server's status code and details.

Modules: library (Client and friends, re-exported here), cli (the command line; __main__ runs it), arrays
(.npy / IDX digit files), security (client TLS channels, bearer tokens, the shared command-line flags), probe.
The library is imported on first use of a name below, so the probe does not pay for numpy and protobuf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Client", "Classification", "DEFAULT_ADDRESS", "image_messages", "ordered_map", "preprocess"]
_LIBRARY_NAMES = frozenset(__all__) | {"FIT_CHOICES", "INVERT_CHOICES"}

if TYPE_CHECKING:
    from serving.client.library import (DEFAULT_ADDRESS, FIT_CHOICES, INVERT_CHOICES, Classification, Client,
                                        image_messages, ordered_map, preprocess)


def __getattr__(name: str):
    if name in _LIBRARY_NAMES:
        from serving.client import library

        return getattr(library, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LIBRARY_NAMES)
