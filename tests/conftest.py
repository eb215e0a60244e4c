"""Shared fixtures: a tiny synthetic MNIST in torchvision's layout, a tiny checkpoint.

Nothing here downloads anything; the real data set is only used by tests marked `slow`.
Helpers live in tests/support.py (`from support import make_checkpoint, synthetic_digits`).
"""

from __future__ import annotations

import pytest

from support import make_checkpoint, synthetic_digits, write_synthetic_mnist  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def tiny_mnist_root(tmp_path_factory):
    """A torchvision-layout MNIST root with 512 train / 128 test synthetic digits."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a `fast`, m=2 checkpoint (random weights)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
