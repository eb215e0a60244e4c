"""The detector registry (export.detectors): one table the export, its CLI and the evaluation read; every in-graph
detector's torch module and exported graphs agree with its numpy reference; the learned detector's logistic fit and
its held-out split (the threshold's images are in no fit); `--detector learned` end to end."""

import numpy as np
import pytest
import torch

from export.detectors import (AUTO_DETECTOR, DEFAULT_DETECTOR, DETECTOR_WITH_NEGATIVES, IN_GRAPH, REGISTRY, THRESHOLD,
                              Features, FitData, Head, detector_for, get, table)
from export.detectors.logistic import fit_logistic
from export.inference_module import build_inference_module, graph_features
from support import make_checkpoint, synthetic_digits
from training.checkpoint import load_checkpoint, rebuild_model


def _digits(n, seed):
    images, labels = synthetic_digits(n, seed)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def _random_features(n, rng, classes=10, dims=(6, 5, 4), embedding=8):
    """Random features (logits, embedding, three taps) whose class means differ, and their labels."""
    labels = rng.permutation(np.arange(n) % classes)
    shift = rng.normal(size=(classes, sum(dims) + embedding + classes))[labels]
    x = (rng.normal(size=(n, shift.shape[1])) + 2.0 * shift).astype(np.float32)
    cuts = np.cumsum([0, *dims, embedding, classes])
    taps = tuple(x[:, a:b] for a, b in zip(cuts[:len(dims)], cuts[1:len(dims) + 1]))
    return Features(3.0 * x[:, cuts[-2]:], x[:, cuts[-3]:cuts[-2]], taps), labels


def _fit(detector, features, labels, head, negatives):
    rows = detector.split_rows(len(labels))
    wanted = detector.negatives_needed(rows)
    return detector.fit(FitData(head, {p: (features.rows(rows[p]), labels[rows[p]]) for p in detector.fits_on},
                                negatives.rows(np.arange(wanted[0])) if wanted else None))


# --- the registry ------------------------------------------------------------------------------------------------

def test_registry_names_descriptions_and_default():
    assert all(name == d.name and d.description for name, d in REGISTRY.items())
    assert {"max_cosine", "mahalanobis", "multilayer_mahalanobis", "msp", "max_logit", "feature_norm", "energy",
            "learned"} == set(REGISTRY)
    assert {"msp", "max_logit", "energy", "learned"} <= set(IN_GRAPH) and "feature_norm" not in IN_GRAPH
    assert DEFAULT_DETECTOR == "multilayer_mahalanobis" and DEFAULT_DETECTOR in IN_GRAPH
    with pytest.raises(ValueError, match="name of its own"):
        table(REGISTRY["msp"], REGISTRY["msp"])
    for detector in REGISTRY.values():  # every part a detector fits on is one of its split's, and so is THRESHOLD
        assert THRESHOLD in detector.split and set(detector.fits_on) <= set(detector.split), detector


def test_the_evaluations_scores_are_registered_detectors():
    from export.evaluate import SCORES
    from export.margin_study import STUDY_SCORES

    assert set(SCORES) - {"known_score"} <= set(REGISTRY) and set(STUDY_SCORES) - {"known_score"} <= set(REGISTRY)


def test_unknown_detector_names_the_registry(tmp_path, tiny_checkpoint):
    from export.repository import ExportError, export_repository

    with pytest.raises(ValueError) as info:
        get("nope")
    assert all(name in str(info.value) for name in REGISTRY)
    with pytest.raises(ExportError, match="max_cosine"):
        export_repository(tiny_checkpoint, tmp_path / "repo", detector="nope", log=lambda *_: None)
    with pytest.raises(ExportError, match="cannot compute the feature_norm"):
        export_repository(tiny_checkpoint, tmp_path / "repo", detector="feature_norm", log=lambda *_: None)
    assert not (tmp_path / "repo").exists()


def test_cli_detector_choices_are_the_registrys_in_graph_names():
    from export.cli import get_args_parser

    action = next(a for a in get_args_parser()._actions if "--detector" in a.option_strings)
    assert tuple(action.choices) == (AUTO_DETECTOR, *IN_GRAPH) and action.default == AUTO_DETECTOR


def test_auto_picks_the_learned_detector_for_a_net_trained_beside_negatives():
    """What make demo ships: learned for the fast recipe (trained with --negatives on), the stage distances for a
    net that saw digits only, or one written before the flag existed."""
    assert detector_for({"config": {"train_args": {"negatives": "on"}}}) == DETECTOR_WITH_NEGATIVES == "learned"
    assert detector_for({"config": {"train_args": {"negatives": "off"}}}) == DEFAULT_DETECTOR
    assert detector_for({"config": {"train_args": {}}}) == DEFAULT_DETECTOR


# --- module vs numpy reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", IN_GRAPH)
def test_module_is_the_numpy_reference_on_random_features(name):
    rng = np.random.default_rng(1)
    features, labels = _random_features(240, rng)
    other, _ = _random_features(240, rng)  # negatives: flatter logits, features farther out
    negatives = Features(other.logits[:, ::-1] * 0.3, 3.0 * other.embedding, tuple(4.0 * t for t in other.taps))
    head = Head(rng.normal(size=(10, 8)).astype(np.float32), temperature=0.7)
    detector = get(name)
    params = _fit(detector, features, labels, head, negatives)
    module = detector.module(params, head)
    for probe in (features, negatives):
        with torch.no_grad():
            got = module(torch.from_numpy(probe.logits.copy()), torch.from_numpy(probe.embedding.copy()),
                         [torch.from_numpy(t.copy()) for t in probe.taps]).numpy()
        reference = detector.score(probe, params, head)
        assert got.shape == reference.shape == (len(probe),)
        assert np.allclose(got, reference, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(reference).max()))), name


@pytest.fixture(scope="module")
def tiny_net(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    return rebuild_model(ckpt).eval(), ckpt["config"]["normalization"]


@pytest.mark.parametrize("name", IN_GRAPH)
def test_exported_graphs_known_score_is_the_numpy_reference(tmp_path, tiny_net, name):
    """ONNX (opset 17, onnxruntime) and TorchScript compute the detector as its numpy reference does on the graph's
    own logits, embedding and stage taps (images with ink: the floor for blank ones is the graph's, not the
    detector's)."""
    from export.graphs import load_onnx_session, load_torchscript, write_onnx, write_torchscript

    net, normalization = tiny_net
    images, labels = _digits(96, 3)
    negatives = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (48, 1, 28, 28), dtype=np.uint8))
    base = build_inference_module(net, normalization)
    features, labels = graph_features(base, images), labels.numpy()
    head = Head(net.head.weight.detach().numpy(), temperature=0.8)
    detector = get(name)
    params = _fit(detector, features, labels, head, graph_features(base, negatives))
    module = build_inference_module(net, normalization, detector=name, fitted=params, temperature=0.8)
    probe = torch.cat([images[:24], negatives[:8]])
    reference = detector.score(graph_features(base, probe), params, head)
    write_onnx(module, tmp_path / "model.onnx", 17)
    write_torchscript(module, tmp_path / "model.pt")
    with torch.no_grad():
        eager = module(probe)[2].numpy()
        scripted = load_torchscript(tmp_path / "model.pt")(probe)[2].numpy()
    onnx = load_onnx_session(tmp_path / "model.onnx").run(["known_score"], {"image": probe.numpy()})[0]
    tolerance = 1e-4 * max(1.0, float(np.abs(reference).max()))
    for got in (eager, scripted, onnx):
        assert got.dtype == np.float32 and np.abs(got - reference).max() <= tolerance, name


# --- the learned detector -------------------------------------------------------------------------------------------

def _clouds(n=400, seed=0, features=4):
    """Two Gaussian clouds apart along feature 0 only (the rest is noise at other scales and offsets)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float64)
    x = rng.normal(size=(n, features)) * np.array([1.0, 5.0, 0.1, 30.0]) + np.array([0.0, 3.0, -2.0, 100.0])
    x[:, 0] += 3.0 * (2 * y - 1)
    return x, y


def test_logistic_fit_separates_clouds_and_finds_the_informative_feature():
    from export.open_set import auroc

    x, y = _clouds()
    w, b, standardised = fit_logistic(x, y)
    logit = x @ w + b
    assert auroc(logit[y == 1], logit[y == 0]) > 0.99 and ((logit > 0) == (y == 1)).mean() > 0.97
    assert w[0] > 0 and abs(standardised[0]) > 10 * np.abs(standardised[1:]).max()
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(x, np.ones(len(x)))


def test_logistic_standardisation_is_folded_into_the_weights():
    """w.x + b on raw features is the standardised model's logit: rescaling or shifting a feature changes no
    score, and without a penalty the scores are those of the same regression fitted on raw features."""
    from scipy.optimize import minimize

    x, y = _clouds(seed=1)
    x[:, 0] += np.random.default_rng(2).normal(size=len(x)) * 2.0  # overlap: a finite unpenalised optimum
    w, b, _ = fit_logistic(x, y)
    w2, b2, _ = fit_logistic(x * np.array([10.0, 0.5, 3.0, 0.01]) + np.array([1.0, -4.0, 0.0, 7.0]), y)
    x2 = x * np.array([10.0, 0.5, 3.0, 0.01]) + np.array([1.0, -4.0, 0.0, 7.0])
    assert np.allclose(x @ w + b, x2 @ w2 + b2, atol=1e-5)

    w0, b0, _ = fit_logistic(x, y, l2=0.0)
    sign = 2 * y - 1

    def raw_loss(theta):  # class-balanced (the classes are equal here) mean log-loss on raw features
        return np.logaddexp(0.0, -sign * (x @ theta[:-1] + theta[-1])).mean()

    raw = minimize(raw_loss, np.zeros(5), method="BFGS", options={"gtol": 1e-9}).x
    assert np.allclose(x @ w0 + b0, x @ raw[:-1] + raw[-1], atol=1e-3)


def test_learned_split_keeps_the_threshold_images_out_of_every_fit():
    learned = get("learned")
    rows = learned.split_rows(1000)
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(1000))  # a partition
    assert {part: len(r) for part, r in rows.items()} == {"stats": 500, "logistic": 250, "threshold": 250}
    fitted = np.concatenate([rows[part] for part in learned.fits_on])
    assert not set(rows[THRESHOLD]) & set(fitted) and THRESHOLD not in learned.fits_on
    count, source = learned.negatives_needed(rows)  # hard negatives from the stats digits only
    assert count == 250 and set(source) == set(rows["stats"])
    with pytest.raises(ValueError, match="too few"):
        learned.split_rows(3)


def test_learned_fit_sees_no_threshold_image(tmp_path, tiny_checkpoint, monkeypatch):
    """Through the export's fitting: the fit gets the stats and logistic digits only, the negatives' generator the
    stats digits, and the threshold is picked on the rest."""
    import export.fitting as fitting
    from export.detectors.learned import LearnedDetector

    images, labels = _digits(64, 5)
    seen, generated = {}, {}
    real_fit = LearnedDetector.fit

    def spy_fit(self, data):
        seen.update({part: len(f) for part, (f, _) in data.parts.items()})
        seen["stats_embeddings"] = data.parts["stats"][0].embedding
        seen["logistic_embeddings"] = data.parts["logistic"][0].embedding
        return real_fit(self, data)

    def negatives(count, seed, digits, labels):
        generated.update(count=count, seed=seed, digits=digits)
        return np.random.default_rng(seed).integers(0, 256, (count, 1, 28, 28), dtype=np.uint8)

    monkeypatch.setattr(LearnedDetector, "fit", spy_fit)
    monkeypatch.setattr(fitting, "training_negatives", negatives)
    ckpt = load_checkpoint(tiny_checkpoint)
    net = rebuild_model(ckpt)
    module, _, record = fitting.fit(net, ckpt, images, labels, {"source": "test", "count": 64}, "learned", 0.9,
                                    log=lambda *_: None)
    rows = get("learned").split_rows(64)
    assert (seen["stats"], seen["logistic"]) == (32, 16) and THRESHOLD not in seen
    assert np.array_equal(generated["digits"], images[torch.from_numpy(rows["stats"])].numpy())
    assert generated["count"] == 16 and generated["seed"] == fitting.NEGATIVES_SEED
    embedding = graph_features(build_inference_module(net, ckpt["config"]["normalization"]), images).embedding
    assert np.array_equal(seen["stats_embeddings"], embedding[rows["stats"]])
    assert np.array_equal(seen["logistic_embeddings"], embedding[rows["logistic"]])
    assert record["split"] == {"stats": 32, "logistic": 16, "threshold": 16} and record["threshold_images"] == 16
    assert record["negatives"] == {"count": 16, "generator": fitting.NEGATIVES_GENERATOR,
                                   "seed": fitting.NEGATIVES_SEED, "hard_negatives_from_digits": 32}
    assert record["fit"]["digits"] == 16 and record["fit"]["stats_digits"] == 32
    assert list(record["fit"]["weights"]) == ["mahalanobis_stage1", "mahalanobis_stage2", "mahalanobis_stage3",
                                              "mahalanobis_embedding", "msp", "energy", "max_cosine"]


def test_cli_exports_the_learned_detector_end_to_end(tmp_path):
    """`python -m export CKPT --out R` on a net trained beside negatives (in-process): the learned detector, fitted on training images against the real
    negatives' generator, verified (parity of eager, TorchScript and ONNX known_score included), and the manifest,
    config.pbtxt and the server's reader say what was shipped and what it was fitted on."""
    import json

    from export.cli import main
    from export.graphs import load_onnx_session
    from serving.repository.reader import read_manifest
    from support import write_synthetic_mnist

    from training.checkpoint import save_checkpoint

    mnist = write_synthetic_mnist(tmp_path / "mnist", n_train=160, n_test=32)
    checkpoint = make_checkpoint(tmp_path / "c.pt", test_acc=None)
    ckpt = load_checkpoint(checkpoint)
    ckpt["config"]["train_args"]["negatives"] = "on"  # as the fast recipe trains: the default --detector auto
    save_checkpoint(ckpt, checkpoint)  # then ships the learned detector
    out = tmp_path / "repo"
    assert main([str(checkpoint), "--out", str(out), "--fit-on-training-images",
                 "--data-dir", str(mnist), "--accept-rate", "0.95"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["open_set"]
    assert record["detector"] == "learned" and record["negatives"]["generator"] == "training.negatives.negative_images"
    assert record["negatives"]["count"] == record["fit"]["digits"] == 40 and record["threshold_images"] == 40
    assert record["split"] == {"stats": 80, "logistic": 40, "threshold": 40} and record["fit_accepted"] >= 0.95
    assert len(record["fit"]["weights"]) == 7 and all(np.isfinite(list(record["fit"]["weights"].values())))
    assert read_manifest(out).calibration("lsoftmax_mnist_onnx").detector == "learned"
    assert 'string_value: "learned"' in (out / "lsoftmax_mnist_onnx" / "config.pbtxt").read_text()
    probe = torch.from_numpy(synthetic_digits(32, 9)[0]).unsqueeze(1)
    known = load_onnx_session(out / "lsoftmax_mnist_onnx" / "1" / "model.onnx").run(["known_score"],
                                                                                    {"image": probe.numpy()})[0]
    assert np.isfinite(known).all() and known.std() > 0
