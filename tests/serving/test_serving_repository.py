"""Reading the model repository (serving.repository.reader): model selection, sha256 verification, and a clear
StartupError (never a KeyError) for each defect of manifest.json; the format's one owner (the backend table,
manifest.json and config.pbtxt written by export and read back the same). In-process, but for the server's
config.pbtxt reader (its stubs clash with tritonclient's); the subprocess startup failures are in
test_serving_lifecycle.py. Run: .venv/bin/python -m pytest tests/serving/test_serving_repository.py -q"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from serving.core.errors import StartupError
from serving.repository.reader import read_manifest, verify_sha256


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
    assert manifest.select().name == "lsoftmax_mnist_onnx"  # the default (docs/architecture.md §5)
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


def _set_max_batch_size(config_path, value):
    text = config_path.read_text()
    assert "max_batch_size: 256" in text
    config_path.write_text(text.replace("max_batch_size: 256", f"max_batch_size: {value}"))


def test_edited_config_pbtxt_is_refused(repo_copy):
    """config.pbtxt is listed in manifest.json's files with its sha256: an edited max_batch_size is a StartupError
    naming the file (as a modified model file is), for the model it belongs to and no other."""
    _set_max_batch_size(repo_copy / "lsoftmax_mnist_onnx" / "config.pbtxt", 4096)
    manifest = read_manifest(repo_copy)
    onnx = manifest.models["lsoftmax_mnist_onnx"]
    assert {f.relative for f in onnx.listed} == {"lsoftmax_mnist_onnx/config.pbtxt", "lsoftmax_mnist_onnx/1/model.onnx"}
    with pytest.raises(StartupError) as info:
        verify_sha256(onnx)
    message = str(info.value)
    assert message.startswith(str(repo_copy / "lsoftmax_mnist_onnx" / "config.pbtxt") + ": sha256 mismatch")
    assert "model 'lsoftmax_mnist_onnx'" in message and "files.lsoftmax_mnist_onnx/config.pbtxt" in message
    assert "Re-export the repository" in message and "--max-batch-size" in message
    verify_sha256(manifest.models["lsoftmax_mnist_torchscript"])  # its own config.pbtxt is untouched


def test_missing_listed_file_is_refused(repo_copy):
    (repo_copy / "lsoftmax_mnist_torchscript" / "config.pbtxt").unlink()
    manifest = read_manifest(repo_copy)
    with pytest.raises(StartupError, match=r"config.pbtxt: listed in manifest.json .* but missing.*Re-export"):
        verify_sha256(manifest.models["lsoftmax_mnist_torchscript"])
    verify_sha256(manifest.models["lsoftmax_mnist_onnx"])


def test_files_outside_every_model_folder_are_checked_for_every_model(repo_copy):
    (repo_copy / "README.txt").write_text("exported\n")
    _edit_manifest(repo_copy, lambda m: m["files"].update({"README.txt": "0" * 64}))
    for entry in read_manifest(repo_copy).models.values():
        with pytest.raises(StartupError, match=r"README.txt: sha256 mismatch .*files.README.txt"):
            verify_sha256(entry)


def test_manifest_without_files_checks_the_model_files_only(repo_copy):
    """A repository written without manifest.json's files (bench's tiny repository, hand-made ones) still loads:
    only models.<name>.sha256 is there to check."""
    _set_max_batch_size(repo_copy / "lsoftmax_mnist_onnx" / "config.pbtxt", 4096)
    _edit_manifest(repo_copy, lambda m: m.pop("files"))
    manifest = read_manifest(repo_copy)
    for entry in manifest.models.values():
        assert entry.listed == ()
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
    (lambda m: m["outputs"][0].pop("name"), "outputs[0].name: missing"),
    (lambda m: m["input"].update(shape=[-1, "28"]), "input.shape: expected a list of integers"),
    (lambda m: m["files"].update({"lsoftmax_mnist_onnx/config.pbtxt": "abc"}),
     "files.lsoftmax_mnist_onnx/config.pbtxt: not a hex sha256"),
    (lambda m: m["files"].update({"../outside.txt": "0" * 64}), "files.../outside.txt: points outside the repository"),
    (lambda m: m.update(files=["lsoftmax_mnist_onnx/config.pbtxt"]), "files: expected object, got list"),
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


def test_backend_table_is_the_one_mapping():
    """serving.repository.format.FORMATS: our kind ↔ Triton backend / platform ↔ file ↔ model directory."""
    from serving.backends import BACKENDS
    from serving.repository.format import BY_BACKEND, BY_KIND, FORMATS, format_named

    assert [(f.kind, f.backend, f.platform, f.filename, f.directory) for f in FORMATS] == [
        ("onnx", "onnxruntime", "onnxruntime_onnx", "model.onnx", "lsoftmax_mnist_onnx"),
        ("torchscript", "pytorch", "pytorch_libtorch", "model.pt", "lsoftmax_mnist_torchscript")]
    assert BACKENDS == {"onnx": "onnxruntime", "torchscript": "pytorch"}  # the server's --backend choices
    assert BY_KIND["onnx"].file() == "lsoftmax_mnist_onnx/1/model.onnx"
    assert format_named("pytorch") is format_named("torchscript") is BY_BACKEND["pytorch"]
    with pytest.raises(KeyError, match="tensorflow"):
        format_named("tensorflow")


def test_exported_manifest_round_trips_through_the_typed_structure(model_repository):
    """What export wrote is what RepositoryManifest reads, and writing it again gives the same bytes."""
    from serving.repository.format import ALL_OUTPUTS, FORMATS, INPUT
    from serving.repository.manifest import RepositoryManifest, load_manifest

    text = (model_repository / "manifest.json").read_text()
    spec = load_manifest(model_repository / "manifest.json")
    assert spec.to_dict() == json.loads(text)
    assert json.dumps(spec.to_dict(), indent=2) + "\n" == text
    assert RepositoryManifest.from_dict(spec.to_dict()) == spec == read_manifest(model_repository).spec
    assert spec.input.name == INPUT and [o.name for o in spec.outputs] == list(ALL_OUTPUTS)
    assert {name: (m.backend, m.file) for name, m in spec.models.items()} == {
        f.directory: (f.backend, f.file()) for f in FORMATS}
    assert set(spec.records) == {"onnx", "parity", "source_checkpoint", "exporter", "calibration", "open_set"}


def test_exported_config_pbtxt_round_trips_through_model_config(model_repository):
    """Each config.pbtxt parses back (inference.ModelConfig, text format) to the message the builder makes."""
    from serving.repository.config import model_config, read_config
    from serving.repository.format import BY_KIND

    manifest = read_manifest(model_repository)
    for entry in manifest.models.values():
        config = read_config(model_repository / entry.name / "config.pbtxt")
        expected = model_config(BY_KIND[entry.kind], manifest.max_batch_size, manifest.num_classes,
                                manifest.embedding_dim)
        assert config == expected
        assert (config.name, config.backend, config.max_batch_size) == (entry.name, entry.backend, 256)
        assert [(i.name, list(i.dims)) for i in config.input] == [(manifest.input_name, [1, 28, 28])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10]), ("embedding", [128]),
                                                                    ("known_score", [1])]
        assert config.output[2].HasField("reshape") and not config.output[2].reshape.shape  # [batch] in the graph
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 32, 64]


def test_optional_keys_may_be_null(repo_copy):
    """export records test_accuracy as null when the checkpoint has none; the reader takes it as unknown."""
    _edit_manifest(repo_copy, lambda m: m.update(test_accuracy=None, margin=None))
    manifest = read_manifest(repo_copy)
    assert manifest.test_accuracy is None and manifest.margin == 0
    assert manifest.spec.to_dict()["test_accuracy"] is None and "margin" not in manifest.spec.to_dict()


def test_the_backend_feeds_the_manifests_input_name(model_repository):
    """load_backend checks the graph against the input name it is given (the manifest's), not a literal."""
    from serving.backends import load_backend

    entry = read_manifest(model_repository).select(backend="onnx")
    with pytest.raises(StartupError, match="expected one input 'pixels'"):
        load_backend(entry.kind, entry.path, "cpu", input_name="pixels")
    load_backend(entry.backend, entry.path, "cpu", input_name="image").close()


def test_server_reads_config_pbtxt_or_derives_it(repo_copy, helpers):
    """serving.repository.model_config (the server's reader, stub messages: run in a subprocess) parses config.pbtxt through
    serving.repository.config, derives the interface when there is none, and names the file when it is broken."""
    (repo_copy / "lsoftmax_mnist_onnx" / "config.pbtxt").unlink()
    (repo_copy / "lsoftmax_mnist_torchscript" / "config.pbtxt").write_text("name: [unclosed\n")
    code = textwrap.dedent(f"""
        from serving.backends.batching import BatchingConfig
        from serving.core.errors import StartupError
        from serving.repository.model_config import effective_config, read_model_config
        from serving.repository.reader import read_manifest
        manifest = read_manifest({str(repo_copy)!r})
        onnx = manifest.models["lsoftmax_mnist_onnx"]
        config = read_model_config(onnx, manifest)
        assert (config.name, config.backend, config.max_batch_size) == (onnx.name, "onnxruntime", 256), config
        assert [i.name for i in config.input] == ["image"] and [o.name for o in config.output] == ["logits", "embedding", "known_score"]
        assert not config.HasField("dynamic_batching") and not config.instance_group
        batching = BatchingConfig(max_batch_size=64, max_queue_delay_us=100, max_queue_size=10, enabled=True)
        effective = effective_config(config, onnx, "cpu", batching)
        assert (effective.platform, effective.default_model_filename) == ("onnxruntime_onnx", "model.onnx")
        try:
            read_model_config(manifest.models["lsoftmax_mnist_torchscript"], manifest)
        except StartupError as exc:
            assert "config.pbtxt: not a readable Triton model configuration" in str(exc), exc
        else:
            raise AssertionError("a broken config.pbtxt was accepted")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=helpers.PROJECT_ROOT)
