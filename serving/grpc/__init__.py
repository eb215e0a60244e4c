"""The gRPC transport: lsoftmax.v1 (typed) and KServe v2 servicers, the RPC boundary, health, status codes."""
