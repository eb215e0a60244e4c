"""Checkpoint -> margin-folded TorchScript and ONNX graphs, verified, in a Triton-layout model repository."""
