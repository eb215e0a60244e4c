"""Serving exported L-Softmax MNIST models over gRPC and HTTP: server (`python -m serving`), client
(`python -m serving.client`). The folders are the architecture (docs/architecture.md §2):

- core/: the protocol-neutral inference core (model lookup, limits, images, batching, postprocessing), the call
  boundary (drain, per-model outcomes) and the error types;
- grpc/ and http/: one folder per transport, each a thin adapter over the core with its own status table;
- images/: encoded image → 28x28 (decoding, framing, the decode lanes and their memory budget);
- repository/: the repository format's one owner (names, manifest.json, config.pbtxt; export and bench write
  through it) and reading a repository at startup;
- backends/: ONNX Runtime and TorchScript, the device choice, a loaded model's runner and its dynamic batcher;
- client/: the client library, its CLI, arrays, probe, client TLS/tokens;
- at the top: options (flags), server (lifecycle), metrics, security, logs, malloc.
Imports nothing from `training` or `export`: the serving image ships without them. Generated stubs live in
serving/_proto (regenerate with `make protos`, i.e. `python scripts/protos_gen.py`).
"""
