"""L-Softmax MNIST training: data, the margin layer, the nets, the training loop and checkpoints."""
