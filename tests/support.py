"""Test helpers shared across the tree (importable as `support` because pytest puts tests/ on sys.path):
tiny synthetic MNIST digits, a torchvision-layout root of them, and tiny training checkpoints."""

from __future__ import annotations

import numpy as np
import torch


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 28, 28] images whose class is a bright 6x6 square at one of 10 grid cells, over faint noise:
    easy enough that a net learns it in a few iterations, so training tests can check accuracy moves."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        images[i, 2 + 7 * r:8 + 7 * r, 2 + 7 * col:8 + 7 * col] = 255
    return images, labels


def write_synthetic_mnist(root, n_train: int = 512, n_test: int = 128, seed: int = 0):
    from training.data import write_idx_files

    tr_x, tr_y = synthetic_digits(n_train, seed)
    te_x, te_y = synthetic_digits(n_test, seed + 1)
    write_idx_files(root, {
        "train-images-idx3-ubyte": tr_x, "train-labels-idx1-ubyte": tr_y,
        "t10k-images-idx3-ubyte": te_x, "t10k-labels-idx1-ubyte": te_y,
    })
    return root


def make_checkpoint(path, model: str = "fast", margin: int = 2, seed: int = 0, test_acc: float = 12.5):
    """A randomly initialised net saved as a training checkpoint, with non-trivial BatchNorm statistics
    and PReLU slopes (so an export that ignored them would be caught)."""
    from training.checkpoint import save_checkpoint
    from training.data import MNIST_MEAN, MNIST_STD
    from training.models import build_model, embedding_dim

    torch.manual_seed(seed)
    net = build_model(model, margin)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.05, 0.4)
    net.head.beta.fill_(3.0)
    config = {
        "model": model, "margin": margin, "num_classes": 10, "embedding_dim": embedding_dim(model),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD, "scale": 1.0 / 255.0},
        "input": {"shape": [1, 28, 28], "dtype": "uint8", "polarity": "white digit on black (MNIST)"},
        "train_args": {"model": model, "margin": margin, "seed": seed},
    }
    metrics = {"epoch": 1, "test_acc": test_acc}
    save_checkpoint({"config": config, "model": net.state_dict(), "epoch": 1, "metrics": metrics}, path)
    return path


# Parse the arguments with the command's real parser, then stop before it does any work. Runs in a fresh
# process: the serving package's `inference.*` protos must not meet tritonclient's, which other tests import.
_PARSE_ONLY = """
import argparse, runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "training.reproduce":  # its own flags, then those it passes on to each training run
    from training.reproduce import parse_arguments
    parse_arguments(sys.argv[1:])
    raise SystemExit(0)
_inside_parse_args = []
def _stop(self, args=None, namespace=None):
    _inside_parse_args.append(True)
    _original(self, args, namespace)
    raise SystemExit(0)
def _stop_known(self, args=None, namespace=None):
    result = _original_known(self, args, namespace)
    if not _inside_parse_args:  # a program that parses only what it knows must not go on to real work
        raise SystemExit(0)
    return result
_original, _original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = _stop, _stop_known
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

PROJECT_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def parse_only(words: list[str]):
    """`python -m WORDS[0] WORDS[1:]` (or a script path) through its own argument parser only."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _PARSE_ONLY, *words], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


_PARSE_MANY = """
import argparse, contextlib, io, json, sys
results = []
for words in json.loads(sys.stdin.read()):
    err, saved = io.StringIO(), (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args)
    with contextlib.redirect_stderr(err):
        try:
            exec(compile(PARSE_ONLY, "<parse_only>", "exec"), {"__name__": "__parse_only__", "_argv": ["-", *words]})
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def parse_only_many(commands: list[list[str]]) -> list[tuple[int, str]]:
    """parse_only for many commands in one fresh process (one interpreter and torch import instead of one
    each); [(exit code, stderr)] in order."""
    import json
    import subprocess
    import sys

    prelude = "PARSE_ONLY = " + repr("import sys\nsys.argv = _argv\n" + _PARSE_ONLY) + "\n"
    result = subprocess.run([sys.executable, "-c", prelude + _PARSE_MANY], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300, input=json.dumps(commands))
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(r) for r in json.loads(result.stdout.strip().splitlines()[-1])]


def option_strings(factory: str) -> set[str]:
    """Every option string of `module:get_args_parser` (subcommands included), read in a fresh process."""
    import json
    import subprocess
    import sys

    module, func = factory.split(":")
    code = (f"import json, argparse\nfrom {module} import {func}\np = {func}()\nparsers = [p] + [s for a in p._actions "
            "if isinstance(a, argparse._SubParsersAction) for s in a.choices.values()]\n"
            "print(json.dumps(sorted({o for q in parsers for a in q._actions for o in a.option_strings})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))
