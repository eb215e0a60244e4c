"""Encoded images to the model's 28x28 input: decoding, framing, the decode lanes and their memory budget."""
