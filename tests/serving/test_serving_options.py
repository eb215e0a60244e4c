"""Server flags that tune the hot path: --intra-op-threads parses, is refused with a usage message (exit 2)
when it cannot work, and reaches the ONNX Runtime session (and torch) as given. In-process, no server.
Run: .venv/bin/python -m pytest tests/serving/test_serving_options.py -q"""

from __future__ import annotations

import pytest

from bench.tiny_repo import tiny_repo
from serving.backends import load_backend
from serving.options import DEFAULT_INTRA_OP_THREADS, get_args_parser
from serving.repository.reader import read_manifest


def _parse(*flags: str):
    return get_args_parser().parse_args(["--model-repository", "REPO", *flags])


def test_intra_op_threads_parses_with_a_measured_default():
    assert _parse().intra_op_threads == DEFAULT_INTRA_OP_THREADS == 1
    assert _parse("--intra-op-threads", "4").intra_op_threads == 4


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "100000"])
def test_bad_intra_op_threads_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exited:
        _parse("--intra-op-threads", value)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "usage:" in err and "--intra-op-threads" in err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("options") / "repo"
    tiny_repo(out)
    return read_manifest(out).select(None, "onnx")


@pytest.mark.parametrize("threads", [1, 3])
def test_intra_op_threads_reach_the_onnx_session(tiny, threads):
    backend = load_backend("onnx", tiny.path, "cpu", intra_op_threads=threads)
    try:
        assert backend._session.get_session_options().intra_op_num_threads == threads
        assert backend.intra_op_threads == threads
    finally:
        backend.close()


def test_without_the_flag_onnx_runtime_keeps_its_default(tiny):
    backend = load_backend("onnx", tiny.path, "cpu")
    try:
        assert backend._session.get_session_options().intra_op_num_threads == 0  # ONNX Runtime: one per core
    finally:
        backend.close()


def test_intra_op_threads_reach_torch(monkeypatch):
    import torch

    from serving.backends import torchscript

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # process-wide: never change it for other tests
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: torch.nn.Identity())
    torchscript.TorchScriptBackend("unused.pt", "cpu", intra_op_threads=2)
    assert calls == [2]


def test_the_server_passes_the_default_to_its_session(onnx_server):
    """End to end: the shared server runs without the flag, and its model_ready line reads the session back."""
    ready = onnx_server.wait_for("model_ready")
    assert ready["intra_op_threads"] == DEFAULT_INTRA_OP_THREADS
