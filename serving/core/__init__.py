"""The protocol-neutral core both transports (serving/grpc, serving/http) stand on: inference (model lookup,
limits, images, batching, postprocessing) and the call boundary (auth, drain, metrics)."""
