"""Numerics on the backend's outputs: softmax probabilities, top-k classes, L2-normalised embeddings.

Pure numpy, vectorised over the batch; the servicer turns the results into protobuf messages.
"""

from __future__ import annotations

import numpy as np

__all__ = ["softmax", "top_k", "l2_normalize"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 [N, C] → probabilities [N, C] (max-subtracted, so large logits cannot overflow)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, k] labels, [N, k] probabilities), most probable first; ties keep the lower label first."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


def l2_normalize(embedding: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(embedding.astype(np.float64), axis=1, keepdims=True)
    return (embedding / np.maximum(norms, eps)).astype(np.float32)
