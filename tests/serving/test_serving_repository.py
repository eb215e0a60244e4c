"""Reading the model repository (serving.repository): model selection, sha256 verification, and a clear
StartupError (never a KeyError) for each defect of manifest.json. In-process; the subprocess startup
failures are in test_serving_lifecycle.py. Run: .venv/bin/python -m pytest tests/serving/test_serving_repository.py -q"""

from __future__ import annotations

import json
import shutil

import pytest

from serving.errors import StartupError
from serving.repository import read_manifest, verify_sha256


@pytest.fixture
def repo_copy(model_repository, tmp_path):
    out = tmp_path / "repo"
    shutil.copytree(model_repository, out)
    return out


def _edit_manifest(repo, edit):
    path = repo / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_reads_the_exported_manifest(model_repository):
    manifest = read_manifest(model_repository)
    assert manifest.net == "fast" and manifest.margin == 2
    assert (manifest.num_classes, manifest.embedding_dim) == (10, 128)
    assert set(manifest.models) == {"lsoftmax_mnist_onnx", "lsoftmax_mnist_torchscript"}
    for entry in manifest.models.values():
        verify_sha256(entry)
        assert entry.version == "1" and entry.path.is_file()


def test_model_selection(model_repository):
    manifest = read_manifest(model_repository)
    assert manifest.select().name == "lsoftmax_mnist_onnx"  # the default of DESIGN §2
    assert manifest.select(backend="torchscript").name == "lsoftmax_mnist_torchscript"
    assert manifest.select(model="lsoftmax_mnist_torchscript").kind == "torchscript"
    with pytest.raises(StartupError, match="'nope' is not in .*lsoftmax_mnist_onnx"):
        manifest.select(model="nope")
    with pytest.raises(StartupError, match="is a onnx model but --backend torchscript"):
        manifest.select(model="lsoftmax_mnist_onnx", backend="torchscript")


def test_sha256_mismatch_is_refused(repo_copy):
    entry = read_manifest(repo_copy).select()
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with pytest.raises(StartupError, match="sha256 mismatch for model 'lsoftmax_mnist_onnx'"):
        verify_sha256(entry)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("models"), "models: missing"),
    (lambda m: m.pop("embedding_dim"), "embedding_dim: missing"),
    (lambda m: m.update(num_classes="10"), "num_classes: expected integer, got str"),
    (lambda m: m.update(format="something-else"), "format: expected 'lsoftmax-serve/model-repository'"),
    (lambda m: m.update(format_version=2), "format_version: this server reads version 1"),
    (lambda m: m["models"]["lsoftmax_mnist_onnx"].pop("sha256"), "models.lsoftmax_mnist_onnx.sha256: missing"),
    (lambda m: m["models"]["lsoftmax_mnist_onnx"].update(sha256="abc"), "not a hex sha256"),
    (lambda m: m["models"]["lsoftmax_mnist_onnx"].update(backend="tensorflow"), "unknown backend 'tensorflow'"),
    (lambda m: m["models"]["lsoftmax_mnist_onnx"].update(file="../../etc/passwd"), "points outside the repository"),
    (lambda m: m["models"]["lsoftmax_mnist_onnx"].update(file="lsoftmax_mnist_onnx/1/gone.onnx"), "does not exist"),
    (lambda m: m["input"].update(datatype="FP32"), "input.datatype"),
    (lambda m: m.update(models={}), "models: empty"),
])
def test_manifest_defects_are_clear_errors(repo_copy, edit, message):
    _edit_manifest(repo_copy, edit)
    with pytest.raises(StartupError) as info:
        read_manifest(repo_copy)
    assert message in str(info.value) and "manifest.json" in str(info.value)


def test_missing_or_unreadable_manifest(repo_copy, tmp_path):
    (repo_copy / "manifest.json").write_text("{not json")
    with pytest.raises(StartupError, match="not readable JSON"):
        read_manifest(repo_copy)
    (repo_copy / "manifest.json").unlink()
    with pytest.raises(StartupError, match="no manifest.json"):
        read_manifest(repo_copy)
    with pytest.raises(StartupError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
