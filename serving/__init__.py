"""gRPC serving of exported L-Softmax MNIST models: server (`python -m serving`), client (`python -m serving.client`).

Server pieces, one responsibility per module (docs/architecture.md §2): options (flags), server (lifecycle),
servicer (typed lsoftmax.v1 API), kserve (KServe v2 / Triton protocol), batching (dynamic batching, one worker
thread per model), runner (a loaded model + its batcher), metrics (Prometheus, Triton's names), security (TLS,
bearer tokens), interceptors (auth, status mapping, request metrics, draining), repository_format /
repository_manifest / repository_config (the repository format's one owner: names and backend table,
manifest.json, config.pbtxt; export and bench write through them), repository and model_config (reading a
repository), images / framing / decode_queue (encoded image → 28x28, off the event loop), health, backends/.
Client side: the client/ package (library, CLI, arrays, probe, client TLS/tokens).
Imports nothing from `training` or `export`: the serving image ships without them. Generated stubs live
in serving/_proto (regenerate with `make protos`, i.e. `python scripts/protos_gen.py`).
"""
