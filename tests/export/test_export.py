"""Export: the fold is exact, graphs agree with eager after a save/load round trip, the repository is
self-consistent (manifest hashes, config.pbtxt vs graph), and a failed export leaves nothing behind."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.detectors import Features, Head, get
from export.graphs import load_onnx_session, load_torchscript
from export.inference_module import build_inference_module
from export.repository import ExportError, export_repository
from training.checkpoint import load_checkpoint, rebuild_model
from training.data import normalize, sha256_file
from support import synthetic_digits

ONNX_DIR = "lsoftmax_mnist_onnx"
TS_DIR = "lsoftmax_mnist_torchscript"


def _synthetic(n=96, seed=5):
    from support import synthetic_digits

    x, y = synthetic_digits(n, seed)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_checkpoint):
    images, labels = _synthetic()
    out = tmp_path_factory.mktemp("export") / "repo"
    manifest = export_repository(tiny_checkpoint, out, images=images, labels=labels, log=lambda *_: None)
    return out, manifest, images


def test_fold_is_exact(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    net = rebuild_model(ckpt)
    inference = build_inference_module(net, ckpt["config"]["normalization"])
    images, labels = _synthetic(32)
    with torch.no_grad():
        folded_logits, embedding, _ = inference(images)
        x = normalize(images)
        torch.testing.assert_close(folded_logits, net(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(folded_logits, net(x, labels), rtol=0, atol=1e-5)  # eval: no margin
        torch.testing.assert_close(embedding, net.embed(x), rtol=0, atol=1e-5)
    names = {n for n, _ in inference.named_modules()}
    assert not any("head" in n for n in names), "the margin layer must be gone"
    assert inference.classifier.bias is None and torch.equal(inference.classifier.weight, net.head.weight)


@pytest.mark.parametrize("batch", [1, 64])
def test_graphs_match_eager_after_round_trip(repo, tiny_checkpoint, batch):
    out, manifest, images = repo
    ckpt = load_checkpoint(tiny_checkpoint)
    inference = build_inference_module(rebuild_model(ckpt), ckpt["config"]["normalization"])
    x = images[:batch]
    with torch.no_grad():
        ref_logits, ref_emb, ref_known = (t.numpy() for t in inference(x))
    ts_logits, ts_emb, ts_known = (t.numpy() for t in load_torchscript(out / TS_DIR / "1" / "model.pt")(x))
    ort_logits, ort_emb, ort_known = load_onnx_session(out / ONNX_DIR / "1" / "model.onnx").run(None, {"image": x.numpy()})
    assert ts_logits.shape == (batch, 10) and ts_emb.shape == (batch, 128) and ts_known.shape == (batch,)
    for logits, emb, known in ((ts_logits, ts_emb, ts_known), (ort_logits, ort_emb, ort_known)):
        assert np.abs(logits - ref_logits).max() <= 1e-4
        assert np.abs(emb - ref_emb).max() <= 1e-4
        assert np.abs(known - ref_known).max() <= 1e-4
        assert (logits.argmax(1) == ref_logits.argmax(1)).all()
    parity = manifest["parity"]
    assert set(parity["batches"]) == {"bs1", "bs64", "full"}
    assert parity["accuracy"]["torchscript"] == parity["accuracy"]["onnxruntime"] == parity["accuracy"]["eager"]


def test_onnx_opset_ops_and_uint8_contract(repo):
    import onnx

    out, manifest, images = repo
    model = onnx.load(str(out / ONNX_DIR / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Acos", "Cos", "Floor"}
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == ["logits", "embedding", "known_score"]
    session = load_onnx_session(out / ONNX_DIR / "1" / "model.onnx")
    assert session.get_inputs()[0].type == "tensor(uint8)"
    with pytest.raises(Exception):
        session.run(None, {"image": images[:2].float().numpy()})


def test_torchscript_loads_without_project_code(repo):
    out, _, _ = repo
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(out / TS_DIR / '1' / 'model.pt')!r})\n"
        "logits, emb, known = m(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))\n"
        "assert logits.shape == (3, 10) and emb.shape == (3, 128) and known.shape == (3,)\n"
        "assert not any(k == 'training' or k.startswith(('training.', 'export')) for k in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=out)


def test_manifest_hashes_and_facts(repo):
    out, manifest, _ = repo
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["files"] == manifest["files"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, sha in manifest["files"].items():
        assert sha256_file(out / rel) == sha
    for name, entry in manifest["models"].items():
        assert sha256_file(out / entry["file"]) == entry["sha256"]
    assert manifest["net"] == "fast" and manifest["margin"] == 2 and manifest["embedding_dim"] == 128
    assert manifest["input"]["datatype"] == "UINT8" and manifest["input"]["normalization"]["mean"] == pytest.approx(0.1307)
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["exporter"])


@pytest.mark.parametrize("model_dir,backend,graph", [(ONNX_DIR, "onnxruntime", "onnx"), (TS_DIR, "pytorch", "ts")])
def test_config_pbtxt_matches_graph(repo, model_dir, backend, graph):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, manifest, _ = repo
    cfg = text_format.Parse((out / model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == model_dir and cfg.backend == backend and cfg.max_batch_size == 256
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_UINT8, [1, 28, 28])
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        ("logits", model_config_pb2.TYPE_FP32, [10]), ("embedding", model_config_pb2.TYPE_FP32, [128]),
        ("known_score", model_config_pb2.TYPE_FP32, [1])]
    # known_score is [batch] in the graph: Triton's way to say so is dims [1] with an empty reshape
    assert [(o.HasField("reshape"), list(o.reshape.shape)) for o in cfg.output] == [(False, []), (False, []), (True, [])]
    x = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    if graph == "onnx":
        outs = load_onnx_session(out / model_dir / "1" / "model.onnx").run(None, {"image": x.numpy()})
    else:
        outs = [t.numpy() for t in load_torchscript(out / model_dir / "1" / "model.pt")(x)]
    assert [list(o.shape) for o in outs] == [[5, 10], [5, 128], [5]]
    assert [list(o.shape[1:]) for o in outs] == [list(o.reshape.shape if o.HasField("reshape") else o.dims)
                                                 for o in cfg.output]


@pytest.mark.parametrize("model_dir", [ONNX_DIR, TS_DIR])
def test_config_pbtxt_is_written_through_model_config(repo, model_dir):
    """config.pbtxt is serving.repository.config's ModelConfig message in text format (no template): it parses
    strictly under Triton's full schema (tritonclient's) into exactly the message the builder makes."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.writer import config_parameters
    from serving.repository.config import config_text, model_config
    from serving.repository.format import BY_BACKEND

    out, manifest, _ = repo
    text = (out / model_dir / "config.pbtxt").read_text()
    triton = text_format.Parse(text, model_config_pb2.ModelConfig())  # unknown fields would raise here
    built = model_config(BY_BACKEND[manifest["models"][model_dir]["backend"]], manifest["max_batch_size"],
                         manifest["num_classes"], manifest["embedding_dim"], parameters=config_parameters(manifest))
    assert text == config_text(built)
    assert triton == model_config_pb2.ModelConfig.FromString(built.SerializeToString())
    assert triton.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert triton.dynamic_batching.max_queue_delay_microseconds == 200
    assert not triton.parameters  # unfitted (no held-out split): nothing to tell


def test_private_model_config_schema_is_the_generated_stubs():
    """repository_config builds ModelConfig from a private descriptor pool (tritonclient shares this process);
    its schema is byte for byte the generated stub's. Checked in a subprocess, which may import the stub."""
    code = (
        "from serving._proto.inference import model_config_pb2 as mc\n"
        "from serving.repository.config import message_type\n"
        "private = message_type().DESCRIPTOR.file\n"
        "assert private.serialized_pb == mc.DESCRIPTOR.serialized_pb and private.pool is not mc.DESCRIPTOR.pool\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_failed_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    import export.writer as writer
    from export.verify import ParityError

    def broken(*args, **kwargs):
        raise ParityError("simulated disagreement")

    monkeypatch.setattr(writer, "check_parity", broken)
    images, labels = _synthetic(16)
    with pytest.raises(ParityError):
        export_repository(tiny_checkpoint, tmp_path / "repo", images=images, labels=labels, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_repository_is_world_readable_whatever_the_umask(tmp_path, tiny_checkpoint, monkeypatch):
    """The serving image reads the repository as another user: every folder 0755 and every file 0644, set outright
    (mkdtemp makes the top folder 0700; under umask 077 everything would be private), before the rename into
    place, which is followed by an fsync of the parent folder."""
    import export.publish as publish

    out, synced, real = tmp_path / "repo", [], publish.fsync_dir

    def fsync_dir(path):
        synced.append((Path(path), out.exists()))
        real(path)

    monkeypatch.setattr(publish, "fsync_dir", fsync_dir)
    images, labels = _synthetic(16)
    umask = os.umask(0o077)
    try:
        export_repository(tiny_checkpoint, out, images=images, labels=labels, log=lambda *_: None)
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path).as_posix(): (p.is_dir(), stat.S_IMODE(p.stat().st_mode))
             for p in [out, *out.rglob("*")]}
    assert {"repo", f"repo/{ONNX_DIR}/1", f"repo/{TS_DIR}/1/model.pt", "repo/manifest.json"} <= set(modes)
    assert {rel: mode for rel, (is_dir, mode) in modes.items() if mode != (0o755 if is_dir else 0o644)} == {}
    assert synced[-1] == (tmp_path, True)  # the parent, after the rename
    assert all(not there for _, there in synced[:-1])  # the tree's own folders, before it


def test_existing_output_needs_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    images, labels = _synthetic(16)
    with pytest.raises(ExportError, match="not empty"):
        export_repository(tiny_checkpoint, out, images=images, labels=labels, log=lambda *_: None)
    assert (out / "keep.txt").read_text() == "mine"
    export_repository(tiny_checkpoint, out, force=True, images=images, labels=labels, log=lambda *_: None)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_export_removes_what_a_killed_export_left(tmp_path, tiny_checkpoint):
    """A killed export leaves its temporary folder beside the output; the next export to that output removes it
    (its own name pattern, a dead pid, quiet for export.leftovers.STALE_AFTER_S) and nothing else."""
    from export.leftovers import STALE_AFTER_S

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid no live process has
    then = time.time() - 2 * STALE_AFTER_S
    stale = tmp_path / f".repo.tmp-{child.pid}-k1lled00"
    mine = tmp_path / ".repo.tmp-mine"  # the user's own, named alike
    other = tmp_path / f".other.tmp-{child.pid}-k1lled00"  # another output's
    for folder in (stale, mine, other):
        (folder / ONNX_DIR / "1").mkdir(parents=True)
        (folder / ONNX_DIR / "1" / "model.onnx").write_bytes(b"half written")
        for path in (folder / ONNX_DIR / "1" / "model.onnx", folder / ONNX_DIR / "1", folder / ONNX_DIR, folder):
            os.utime(path, (then, then))
    images, labels = _synthetic(16)
    logged = []
    export_repository(tiny_checkpoint, tmp_path / "repo", images=images, labels=labels, log=logged.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, mine.name, "repo"])
    assert (mine / ONNX_DIR / "1" / "model.onnx").is_file() and (other / ONNX_DIR / "1" / "model.onnx").is_file()
    assert any(str(stale) in line and "did not finish" in line for line in logged)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("kind", [pytest.param("missing", marks=pytest.mark.slow), "corrupt",
                                  pytest.param("foreign", marks=pytest.mark.slow)])  # a CLI subprocess each
def test_cli_bad_checkpoint_is_one_line(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    result = _cli(path, "--out", tmp_path / "repo")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], result.stderr
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow  # a CLI subprocess; export's refusal is also tested in-process
def test_cli_refuses_non_empty_output(tmp_path, tiny_checkpoint):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "x").write_text("")
    result = _cli(tiny_checkpoint, "--out", out)
    assert result.returncode != 0 and "--force" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_on_real_mnist(tmp_path):
    """The full command verifies on the 10,000 MNIST test digits and prints the parity figures."""
    from support import make_checkpoint

    result = _cli(make_checkpoint(tmp_path / "c.pt", test_acc=None), "--out", tmp_path / "repo")
    assert result.returncode == 0, result.stderr
    assert "accuracy over 10000 images" in result.stdout and "top-1 agreement 100.00%" in result.stdout


@pytest.mark.parametrize("diff, scale, ok", [
    (5e-5, 1.0, True),      # small outputs: absolute 1e-4
    (2e-4, 1.0, False),
    (2e-4, 1080.0, True),   # a deep net's logits in the hundreds: rounding grows with them
    (0.5, 1080.0, False),   # a real export bug is as large as the outputs
])
def test_parity_tolerance_is_relative_to_the_output_scale(diff, scale, ok):
    from export.verify import ParityReport, parity_problems

    stats = {"logits": diff, "logits_scale": scale, "embedding": 0.0, "embedding_scale": 1.0, "top1": 100.0}
    report = ParityReport(batches={"full": {"onnxruntime": stats}})
    assert (parity_problems(report) == []) is ok
    report = ParityReport(fold_max_abs_diff=diff, fold_scale=scale)
    assert (parity_problems(report) == []) is ok


def test_parity_problems_name_top1_disagreements():
    from export.verify import ParityReport, parity_problems

    (problem,) = parity_problems(ParityReport(disagreements={"torchscript": [3, 17]}))
    assert "torchscript" in problem and "[3, 17]" in problem


@pytest.mark.parametrize("config, off_by_images, ok", [
    ({"evaluated_on": "cpu"}, 0, True),
    ({"evaluated_on": "cpu"}, 1, False),             # same arithmetic: the count must match exactly
    ({"evaluated_on": "cuda"}, 5, True),             # CUDA kernels sum in another order: a borderline image may flip
    ({"evaluated_on": "cuda"}, 6, False),
    ({"train_args": {"device": "cpu"}}, 1, False),   # before evaluated_on was recorded
    ({"train_args": {"device": "auto"}}, 10, True),  # maybe bf16 autocast on a GPU
    ({"train_args": {"device": "auto"}}, 11, False),
])
def test_exported_accuracy_must_match_the_checkpoint_within_the_devices_slack(config, off_by_images, ok):
    from export.verify import accuracy_mismatch

    recorded = 99.47
    got = recorded - off_by_images * 100.0 / 10_000
    off = accuracy_mismatch({"eager": recorded, "onnxruntime": got}, recorded, config, 10_000)
    assert (off == {}) is ok and "eager" not in off


# --- calibration and open-set score ----------------------------------------------------

@pytest.mark.parametrize("detector", ["max_cosine", "multilayer_mahalanobis",
                                      pytest.param("mahalanobis", marks=pytest.mark.slow)])  # ~10 s each
def test_fitted_export_records_temperature_and_threshold_and_graphs_agree(tmp_path, tiny_checkpoint, detector):
    images, labels = synthetic_digits(64, seed=5)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    out = tmp_path / "repo"
    manifest = export_repository(tiny_checkpoint, out, images=images, labels=labels, fit_images=images,
                                 fit_labels=labels, detector=detector, accept_rate=0.9, log=lambda *_: None)
    calibration, record = manifest["calibration"], manifest["open_set"]
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model_dir in (ONNX_DIR, TS_DIR):
        cfg = text_format.Parse((out / model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert {k: v.string_value for k, v in cfg.parameters.items()} == {
            "temperature": repr(calibration["temperature"]), "detector": detector,
            "threshold": repr(record["threshold"])}
        assert float(cfg.parameters["threshold"].string_value) == record["threshold"]
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert (record["detector"], record["accept_rate"], record["output"]) == (detector, 0.9, "known_score")
    assert record["fit_accepted"] >= 0.9
    assert {"name": "known_score", "datatype": "FP32", "shape": [-1]} in manifest["outputs"]
    for runtime in ("torchscript", "onnxruntime"):
        assert manifest["parity"]["batches"]["full"][runtime]["known_score"] <= 1e-4 * max(
            1.0, manifest["parity"]["batches"]["full"][runtime]["known_score_scale"])
    known = load_onnx_session(out / ONNX_DIR / "1" / "model.onnx").run(["known_score"], {"image": images.numpy()})[0]
    rows = get(detector).split_rows(64)["threshold"]  # mahalanobis*: the odd rows, max_cosine: all of them
    assert (known[rows] >= record["threshold"] - 1e-5 * max(1.0, abs(record["threshold"]))).mean() >= 0.9
    if detector == "max_cosine":
        logits, embedding = load_onnx_session(out / ONNX_DIR / "1" / "model.onnx").run(
            ["logits", "embedding"], {"image": images.numpy()})
        ckpt = load_checkpoint(tiny_checkpoint)
        weight = rebuild_model(ckpt).head.weight.detach().numpy()
        reference = get("max_cosine").score(Features(logits, embedding), {}, Head(weight))
        assert np.allclose(known, reference, atol=1e-5)


def test_multilayer_mahalanobis_in_the_graph_is_the_numpy_reference(tiny_checkpoint):
    """The graph's known_score (eager, as exported) is the numpy multilayer_mahalanobis on the stage taps +
    embedding, and the taps are the channel means after each pooling stage."""
    from export.detectors.mahalanobis import fit_multilayer_mahalanobis, mahalanobis_distance, multilayer_mahalanobis
    from export.inference_module import stage_features

    ckpt = load_checkpoint(tiny_checkpoint)
    net = rebuild_model(ckpt).eval()
    images, labels = _synthetic(80, seed=11)
    base = build_inference_module(net, ckpt["config"]["normalization"], detector="max_cosine")
    features = [f.numpy() for f in stage_features(base, images)]
    pools = sum(isinstance(m, torch.nn.MaxPool2d) for m in net.backbone)
    assert len(features) == pools + 1 and features[-1].shape[1] == int(ckpt["config"]["embedding_dim"])
    with torch.no_grad():  # the first tap by hand: run the backbone up to its first pool, average over H and W
        x = normalize(images, ckpt["config"]["normalization"]["mean"], ckpt["config"]["normalization"]["std"])
        first = next(i for i, m in enumerate(net.backbone) if isinstance(m, torch.nn.MaxPool2d))
        assert np.allclose(features[0], net.backbone[:first + 1](x).mean(dim=(2, 3)).numpy(), atol=1e-5)
        assert np.allclose(features[-1], net.embed(x).numpy(), atol=1e-5)
    y = labels.numpy()
    fitted = fit_multilayer_mahalanobis([f[0::2] for f in features], y[0::2], [f[1::2] for f in features], 10)
    for layer, f in zip(fitted["layers"], features):  # standardised on the spread rows: median 0, spread 1 there
        d = (mahalanobis_distance(f[1::2], layer) - layer["center"]) / layer["scale"]
        assert abs(np.median(d)) < 1e-9 and np.std(d) == pytest.approx(1.0)
    module = build_inference_module(net, ckpt["config"]["normalization"], detector="multilayer_mahalanobis",
                                    fitted=fitted)
    with torch.no_grad():
        known = module(images)[2].numpy().astype(np.float64)
    reference = multilayer_mahalanobis(features, fitted)
    assert np.allclose(known, reference, rtol=1e-4, atol=1e-3 * max(1.0, float(np.abs(reference).max())))
    with pytest.raises(ValueError, match="stage"):  # without the stage taps (the evaluation reads none) it refuses
        get("multilayer_mahalanobis").score(Features(features[-1] @ np.zeros((128, 10)), features[-1]), fitted,
                                            Head(np.ones((10, 128))))


def test_checkpoint_without_held_out_is_exported_unfitted_and_says_so(tmp_path, tiny_checkpoint):
    images, labels = synthetic_digits(16, seed=2)
    lines = []
    manifest = export_repository(tiny_checkpoint, tmp_path / "repo", images=torch.from_numpy(images).unsqueeze(1),
                                 labels=torch.from_numpy(labels).long(), log=lines.append)
    assert manifest["calibration"] == {"temperature": 1.0, "fitted_on": None}
    assert manifest["open_set"]["threshold"] is None
    assert any("records no held-out images" in line and "--fit-on-training-images" in line for line in lines)


def test_open_set_numerics():
    from export import open_set

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    logits = 3.0 * (rng.normal(size=(2000, 10)) + 2.0 * np.eye(10)[labels])  # too sharp: the best T is near 3
    t = open_set.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
    assert abs(np.log(t) - np.log(grid[np.argmin([open_set.nll(logits, labels, g) for g in grid])])) < 0.02
    assert open_set.accept_threshold(np.arange(100.0), 0.99) == 1.0  # 1 of 100 below
    assert open_set.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert open_set.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert open_set.fpr_at_tpr(np.arange(100.0), np.array([99.0, -1.0])) == 0.5
    probs = np.full((4, 2), 0.5)
    assert open_set.ece(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    assert open_set.ece(np.array([[1.0, 0.0]] * 4), np.array([0, 0, 1, 1])) == pytest.approx(0.5)


def test_unknown_sets_are_uint8_images_and_deterministic():
    from export.unknowns import SYNTHETIC_SETS, unknown_sets

    sets = unknown_sets(n=8, seed=1)
    assert tuple(sets) == SYNTHETIC_SETS
    for name, array in sets.items():
        assert array.dtype == np.uint8 and array.shape == (8, 1, 28, 28), name
    assert sets["letters"].reshape(8, -1).max(1).min() > 0  # every letter has ink
    assert all(np.array_equal(a, b) for a, b in zip(sets.values(), unknown_sets(n=8, seed=1).values()))
