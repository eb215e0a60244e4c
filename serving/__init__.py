"""gRPC serving of exported L-Softmax MNIST models: server (`python -m serving`), client (`python -m serving.client`).

Imports nothing from `training` or `export`: the serving image ships without them. Generated stubs live
in serving/_proto (regenerate with `python -m serving.protos_gen`).
"""
