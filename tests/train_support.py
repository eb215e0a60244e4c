"""Helpers shared by the training CLI tests (test_train_cli.py, test_train_resume.py): the tiny runs' flags,
running the CLI in-process, reading its outputs, and the module-scoped reference run."""

import json

import pytest
import torch

from training.train import main

METRIC_KEYS = {"epoch", "lr", "beta", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One small run: 128 train images at batch 64 = 2 iterations per epoch. Digits only: the training negatives have
# tests of their own (test_train_negatives.py).
SMALL = ["--model", "fast", "--margin", "2", "--epochs", "1", "--batch-size", "64",
         "--train-subset", "128", "--test-subset", "64", "--negatives", "off",
         "--capture-augment", "off"]
# The run that the resume test interrupts: 256 images, 4 iterations x 3 epochs.
THREE_EPOCHS = ["--model", "fast", "--margin", "3", "--epochs", "3", "--batch-size", "64",
                "--train-subset", "256", "--test-subset", "128", "--seed", "5", "--negatives", "off",
                "--capture-augment", "off"]


def train(root, out, *flags):
    """Run the CLI in-process on the synthetic root; returns the exit code."""
    return main(["--data-dir", str(root), "--out", str(out), "--device", "cpu", "--progress", "off", *flags])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last(out):
    return torch.load(out / "last.pt", weights_only=True)


def weights_differ(a, b):
    return any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs are tiny: one intra-op thread is as fast, and does not spin-wait when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unbroken_run(tiny_mnist_root, tmp_path_factory):
    """THREE_EPOCHS run straight through (also the reference for the resume test)."""
    out = tmp_path_factory.mktemp("unbroken")
    assert train(tiny_mnist_root, out, *THREE_EPOCHS) == 0
    return out
