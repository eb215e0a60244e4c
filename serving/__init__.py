"""gRPC serving of exported L-Softmax MNIST models: server (`python -m serving`), client (`python -m serving.client`).

Server pieces, one responsibility per module: server (flags, lifecycle), servicer (typed lsoftmax.v1 API),
kserve (KServe v2 / Triton protocol), batching (dynamic batching, one worker thread per model), runner
(a loaded model + its batcher), metrics (Prometheus, Triton's names), security (TLS, bearer tokens),
interceptors (auth, status mapping, request metrics, draining), model_config (Triton's config.pbtxt),
health, repository, images, backends/. Client side: client, client_cli, probe.
Imports nothing from `training` or `export`: the serving image ships without them. Generated stubs live
in serving/_proto (regenerate with `python -m serving.protos_gen`).
"""
