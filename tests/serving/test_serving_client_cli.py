"""`python -m serving.client` and `python -m serving.client.probe` against the session's ONNX server: classify (text and
--json), embed from a folder and from .npy (atomic output + sidecar), evaluate from .npy and IDX, info, errors
naming the file, the container health probe, exit statuses (0 done, 1 runtime failure, 2 usage) and what each
entry point loads.
Most cases call the CLI's main() in-process (fast); one runs the real `python -m serving.client`.
Run: .venv/bin/python -m pytest tests/serving/test_serving_client_cli.py -q"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.client.cli import get_args_parser, main, parse_args


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(get_args_parser().parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, digits, helpers):
    """digits as PNG files, in ImageFolder layout: LABEL/NNN.png (plus one loose, unlabelled file)."""
    root = tmp_path_factory.mktemp("images")
    images, labels = digits
    paths = []
    for i, (image, label) in enumerate(zip(images[:12], labels[:12])):
        (root / str(label)).mkdir(exist_ok=True)
        path = root / str(label) / f"{i:03d}.png"
        path.write_bytes(helpers.png_bytes(image))
        paths.append(path)
    (root / "loose.png").write_bytes(helpers.png_bytes(images[12]))
    (root / "notes.txt").write_text("not an image")
    return root, paths


def test_classify_text_and_json(capsys, onnx_server, image_folder, digits, model_repository, helpers):
    _, paths = image_folder
    logits, _ = helpers.reference_outputs(model_repository, "onnx", digits[0][:4])
    files = [str(p) for p in paths[:4]]
    code, out, _ = _cli(capsys, "classify", "--server", onnx_server.address, *files)
    assert code == 0
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [line[0] for line in lines] == files
    assert [int(line[1]) for line in lines] == logits.argmax(1).tolist()
    assert all(0.0 < float(line[2]) <= 1.0 for line in lines)

    code, out, _ = _cli(capsys, "classify", "--server", onnx_server.address, "--json", "--top-k", "3", *files)
    rows = json.loads(out)
    assert code == 0 and [row["file"] for row in rows] == files
    probabilities = helpers.softmax(logits)
    for row, p in zip(rows, probabilities):
        assert row["label"] == int(p.argmax()) and row["probability"] == pytest.approx(float(p.max()), abs=1e-5)
        assert [t["label"] for t in row["top_k"]] == np.argsort(-p, kind="stable")[:3].tolist()


def test_classify_save_inputs_writes_what_the_model_saw(capsys, onnx_server, image_folder, digits, tmp_path):
    _, paths = image_folder
    files = [str(p) for p in paths[:3]]
    code, out, err = _cli(capsys, "classify", "--server", onnx_server.address, "--json", "--save-inputs",
                          str(tmp_path / "seen"), *files)
    assert code == 0, err
    rows = json.loads(out)
    from PIL import Image

    for i, row in enumerate(rows):
        saved = Path(row["model_input"])
        assert saved.parent == tmp_path / "seen" and saved.name == f"{i:05d}_{Path(files[i]).stem}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(saved)), digits[0][i])  # 28x28 PNGs: as they are


def test_classify_names_the_bad_file(capsys, onnx_server, image_folder, tmp_path):
    _, paths = image_folder
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:60])
    code, out, err = _cli(capsys, "classify", "--server", onnx_server.address, str(paths[0]), str(broken))
    assert code == 1 and out == "" and f"error: {broken}: corrupt or truncated" in err
    code, _, err = _cli(capsys, "classify", "--server", onnx_server.address, str(tmp_path / "missing.png"))
    assert code == 1 and "no such file" in err


def test_embed_folder_writes_array_and_sidecar(capsys, onnx_server, image_folder, digits, model_repository, helpers,
                                               tmp_path):
    root, _ = image_folder
    out = tmp_path / "folder_embeddings.npy"
    umask = os.umask(0o022)
    try:
        code, _, err = _cli(capsys, "embed", "--server", onnx_server.address, "--input", str(root), "--output",
                            str(out), "--batch-size", "5", "--concurrency", "3")
    finally:
        os.umask(umask)
    assert code == 0, err
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out.with_suffix(".json"))} == {0o644}  # not mkstemp's 0600
    sidecar = json.loads(out.with_suffix(".json").read_text())
    vectors = np.load(out)
    assert vectors.shape == (13, 128) and sidecar["count"] == 13 and sidecar["dim"] == 128
    assert sidecar["model"]["model_name"] == "lsoftmax_mnist_onnx"
    assert sidecar["ids"][-1] == "loose.png" and sidecar["labels"][-1] is None
    images, labels = digits
    order = [int(i.split("/")[1][:3]) for i in sidecar["ids"][:-1]]  # "LABEL/NNN.png"
    assert sidecar["labels"][:-1] == [int(labels[i]) for i in order]
    _, embedding = helpers.reference_outputs(model_repository, "onnx", images[order])
    np.testing.assert_allclose(vectors[:-1], embedding, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder_embeddings.json", "folder_embeddings.npy"]


def test_embed_npy_with_labels_and_normalisation(capsys, onnx_server, digits, tmp_path, model_repository, helpers):
    images, labels = digits
    np.save(tmp_path / "x.npy", images.reshape(-1, 784))
    np.save(tmp_path / "y.npy", labels)
    out = tmp_path / "emb.npy"
    code, _, err = _cli(capsys, "embed", "--server", onnx_server.address, "--input", str(tmp_path / "x.npy"),
                        "--labels", str(tmp_path / "y.npy"), "--output", str(out), "--l2-normalize", "--no-progress")
    assert code == 0, err
    vectors = np.load(out)
    _, embedding = helpers.reference_outputs(model_repository, "onnx", images)
    np.testing.assert_allclose(vectors, embedding / np.linalg.norm(embedding, axis=1, keepdims=True), atol=1e-5)
    sidecar = json.loads((tmp_path / "emb.json").read_text())
    assert sidecar["labels"] == labels.tolist() and sidecar["ids"] == [str(i) for i in range(len(images))]
    assert sidecar["l2_normalized"] is True


def test_embed_failure_leaves_no_output(capsys, onnx_server, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 28, 28), np.float32))
    out = tmp_path / "emb.npy"
    code, _, err = _cli(capsys, "embed", "--server", onnx_server.address, "--input", str(tmp_path / "bad.npy"),
                        "--output", str(out))
    assert code == 1 and "must be uint8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_evaluate_npy_and_idx(capsys, onnx_server, digits, tmp_path, model_repository, helpers):
    images, labels = digits
    logits, _ = helpers.reference_outputs(model_repository, "onnx", images)
    expected = 100.0 * float((logits.argmax(1) == labels).mean())
    np.save(tmp_path / "x.npy", images[:, None])
    np.save(tmp_path / "y.npy", labels.astype(np.int64))
    _write_idx(tmp_path / "x-idx3-ubyte", images)
    _write_idx(tmp_path / "y-idx1-ubyte", labels)
    for x, y in (("x.npy", "y.npy"), ("x-idx3-ubyte", "y-idx1-ubyte")):
        code, out, err = _cli(capsys, "evaluate", "--server", onnx_server.address, "--input", str(tmp_path / x),
                              "--labels", str(tmp_path / y), "--batch-size", "10", "--json", "--no-progress")
        assert code == 0, err
        result = json.loads(out)
        assert result["count"] == len(images) and result["accuracy"] == pytest.approx(expected)
        assert result["manifest_test_accuracy"] == 12.5 and result["backend"] == "onnxruntime"
    code, out, _ = _cli(capsys, "evaluate", "--server", onnx_server.address, "--input", str(tmp_path / "x.npy"),
                        "--labels", str(tmp_path / "y.npy"), "--no-progress")
    assert code == 0 and out.startswith(f"accuracy {expected:.2f}% (")


def test_info_and_the_real_entry_point(capsys, onnx_server, image_folder, helpers):
    code, out, _ = _cli(capsys, "info", "--server", onnx_server.address)
    assert code == 0 and json.loads(out)["model_name"] == "lsoftmax_mnist_onnx"
    _, paths = image_folder
    result = subprocess.run([sys.executable, "-m", "serving.client", "classify", "--server", onnx_server.address,
                             "--json", str(paths[0]), str(paths[1])], cwd=helpers.PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [str(paths[0]), str(paths[1])]
    assert all(set(r) >= {"file", "label", "probability"} for r in rows)


def test_health_probe(onnx_server, helpers):
    probe = [sys.executable, "-m", "serving.client.probe", "--timeout", "20"]  # the answers come at once
    ok = subprocess.run([*probe, "--address", onnx_server.address], cwd=helpers.PROJECT_ROOT, capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    unknown = subprocess.run([*probe, "--address", onnx_server.address, "--service", "nope"],
                             cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout


@pytest.mark.parametrize("argv", [
    ["classify", "--batch-size", "0", "x.png"],
    ["embed", "--concurrency", "-1", "--input", "d", "--output", "o.npy"],
    ["classify", "--top-k", "two", "x.png"],
    ["info", "--token", "t", "--token-file", "f"],
    ["info", "--tls-cert", "c.pem"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2 and "usage:" in capsys.readouterr().err


def test_runtime_failures_exit_1(capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    code, _, err = _cli(capsys, "info", "--server", closed, "--timeout", "0.5")
    assert code == 1 and err.startswith(f"error: {closed}: ")
    code, _, err = _cli(capsys, "info", "--server", closed, "--token-file", str(tmp_path / "missing"))
    assert code == 1 and "cannot read the token file" in err


def test_probe_exit_codes(helpers):
    from serving.client import probe

    with pytest.raises(SystemExit) as exited:
        probe.parse_args(["--tls-key", "k.pem"])
    assert exited.value.code == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert probe.main(probe.parse_args(["--address", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "0.5"])) == 1
    shim = subprocess.run([sys.executable, "-m", "serving.probe", "--help"], cwd=helpers.PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert shim.returncode == 0 and "--address" in shim.stdout


def test_entry_points_load_each_module_once_and_the_probe_stays_light(helpers):
    """`python -m serving.client` runs the package's __main__: cli.py and library.py are each loaded once (not
    once as __main__ and again under their name); the probe imports neither the library nor numpy."""
    code = ("import runpy, sys\nsys.argv = ['serving.client', '--help']\n"
            "try:\n    runpy.run_module('serving.client', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n    pass\n"
            "files = [getattr(m, '__file__', None) or '' for m in list(sys.modules.values())]\n"
            "print(sum(f.endswith(('client/cli.py', 'client/library.py')) for f in files), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], cwd=helpers.PROJECT_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stderr.strip().splitlines()[-1] == "2", run.stderr
    light = subprocess.run([sys.executable, "-c", "import sys, serving.client.probe\n"
                            "print(sorted({'numpy', 'serving.client.library'} & set(sys.modules)))"],
                           cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert light.returncode == 0 and light.stdout.strip() == "[]", light.stdout + light.stderr
