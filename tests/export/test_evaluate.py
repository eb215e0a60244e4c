"""export.evaluate on the tiny exported repository with small generated sets: the report's figures are the
open_set functions applied to the ONNX graph's outputs, the threshold and temperature are the manifest's."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.repository import export_repository
from support import synthetic_digits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fitted_repo(tmp_path_factory, tiny_checkpoint):
    images, labels = synthetic_digits(64, seed=5)
    images, labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    out = tmp_path_factory.mktemp("evaluate") / "repo"
    manifest = export_repository(tiny_checkpoint, out, images=images, labels=labels, fit_images=images,
                                 fit_labels=labels, detector="max_cosine", accept_rate=0.9, log=lambda *_: None)
    return out, manifest


def test_classifier_weight_is_the_checkpoints(fitted_repo, tiny_checkpoint):
    from export.evaluate import classifier_weight
    from training.checkpoint import load_checkpoint, rebuild_model

    out, _ = fitted_repo
    weight = classifier_weight(out / "lsoftmax_mnist_onnx" / "1" / "model.onnx")
    expected = rebuild_model(load_checkpoint(tiny_checkpoint)).head.weight.detach().numpy()
    assert weight.shape == expected.shape and np.allclose(weight, expected, atol=1e-6)


def test_report_figures(fitted_repo):
    from export import open_set
    from export.evaluate import SCORES, evaluate_repository, format_report
    from export.unknowns import unknown_sets

    out, manifest = fitted_repo
    known, labels = synthetic_digits(48, seed=9)
    known = known[:, None]
    unknowns = unknown_sets(n=12, seed=3)
    report = evaluate_repository(out, known, labels, unknowns, notes=["Fashion-MNIST left out"])
    assert report["temperature"] == pytest.approx(manifest["calibration"]["temperature"])
    assert (report["detector"], report["threshold"]) == ("max_cosine", manifest["open_set"]["threshold"])
    assert set(report["unknown_sets"]) == set(unknowns)
    for name, entry in report["unknown_sets"].items():
        assert entry["count"] == 12 and tuple(entry["scores"]) == SCORES
        for s in entry["scores"].values():
            assert 0.0 <= s["auroc"] <= 1.0 and 0.0 <= s["fpr_at_95_tpr"] <= 1.0
        shipped = entry["scores"]["known_score"]
        assert 0.0 <= shipped["rejected"] <= 1.0
        if name == "blank":  # the graph's ink check sends (near-)blank inputs below any threshold
            assert shipped["auroc"] >= entry["scores"]["max_cosine"]["auroc"] - 1e-6
        else:  # otherwise the shipped score is the max cosine detector
            assert shipped["auroc"] == pytest.approx(entry["scores"]["max_cosine"]["auroc"], abs=1e-6)
    digits = report["digits"]
    assert digits["count"] == 48 and 0.0 <= digits["accepted"] <= 1.0 and 0.0 <= digits["accuracy"] <= 1.0

    # the same figures by hand from the graph's outputs
    from export.graphs import load_onnx_session

    session = load_onnx_session(out / "lsoftmax_mnist_onnx" / "1" / "model.onnx")
    logits, _, k_known = session.run(None, {"image": known})
    _, _, k_noise = session.run(None, {"image": unknowns["uniform_noise"]})
    t, threshold = manifest["calibration"]["temperature"], manifest["open_set"]["threshold"]
    noise = report["unknown_sets"]["uniform_noise"]["scores"]["known_score"]
    assert noise["auroc"] == pytest.approx(open_set.auroc(k_known, k_noise))
    assert noise["rejected"] == pytest.approx((k_noise < threshold).mean())
    assert digits["accepted"] == pytest.approx((k_known >= threshold).mean())
    assert digits["ece_after"] == pytest.approx(open_set.ece(open_set.softmax(logits, t), labels))
    assert digits["accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())
    text = format_report(report)
    assert "uniform_noise" in text and "known_score" in text and "note: Fashion-MNIST left out" in text


def test_character_sets_split_off_lookalikes_and_are_reported_per_character(fitted_repo):
    from export import open_set
    from export.evaluate import evaluate_repository, format_report
    from export.graphs import load_onnx_session
    from export.unknowns import LETTERS, LOOKALIKES, character_sets

    out, manifest = fitted_repo
    known, labels = synthetic_digits(48, seed=9)
    known = known[:, None]
    letters = character_sets(n=2 * len(LETTERS), seed=1, names=("letters",))["letters"]
    chars = letters.characters
    report = evaluate_repository(out, known, labels, {"letters": letters.images}, characters={"letters": chars})
    json.dumps(report)  # JSON-ready
    lookalike = np.isin(chars, list(LOOKALIKES))
    main, alike = report["unknown_sets"]["letters"], report["unknown_sets"]["letters_lookalikes"]
    assert list(report["unknown_sets"]) == ["letters", "letters_lookalikes"]
    assert (main["count"], alike["count"]) == ((~lookalike).sum(), lookalike.sum())
    assert main["count"] + alike["count"] == len(chars)
    assert (main["lookalikes"], alike["lookalikes"]) == ("excluded", "only")
    assert alike["characters"] == len(set(LOOKALIKES) & set(LETTERS)) and main["characters"] + alike["characters"] == 62

    session = load_onnx_session(out / "lsoftmax_mnist_onnx" / "1" / "model.onnx")
    k_known = session.run(["known_score"], {"image": known})[0]
    k_letters = session.run(["known_score"], {"image": letters.images})[0]
    threshold = manifest["open_set"]["threshold"]
    assert main["scores"]["known_score"]["auroc"] == pytest.approx(open_set.auroc(k_known, k_letters[~lookalike]))
    assert alike["scores"]["known_score"]["rejected"] == pytest.approx((k_letters[lookalike] < threshold).mean())
    table = report["per_character"]["letters"]
    assert list(table) == list(LETTERS) and report["lookalikes"] == LOOKALIKES
    for char, entry in table.items():
        assert entry["count"] == 2 and entry["resembles"] == LOOKALIKES.get(char)
        assert entry["accepted"] == pytest.approx((k_letters[chars == char] >= threshold).mean())
    text = format_report(report, per_character=True)
    assert "letters_lookalikes" in text and "l ~1" in text and "letters (n=2)" in text
    assert "l ~1" not in format_report(report)
    with pytest.raises(ValueError, match="3 characters for 124 images"):
        evaluate_repository(out, known, labels, {"letters": letters.images}, characters={"letters": chars[:3]})


def test_unfitted_repository_has_no_rejection_column(tmp_path, tiny_checkpoint):
    from export.evaluate import evaluate_repository, format_per_character

    images, labels = synthetic_digits(16, seed=2)
    export_repository(tiny_checkpoint, tmp_path / "repo", images=torch.from_numpy(images).unsqueeze(1),
                      labels=torch.from_numpy(labels).long(), log=lambda *_: None)
    report = evaluate_repository(tmp_path / "repo", images[:, None], labels,
                                 {"blank": np.zeros((4, 1, 28, 28), np.uint8)},
                                 characters={"blank": np.array(list("AlAl"))})
    assert report["threshold"] is None and "accepted" not in report["digits"]
    assert "rejected" not in report["unknown_sets"]["blank"]["scores"]["known_score"]
    assert report["per_character"]["blank"]["A"] == {"count": 2, "accepted": None, "resembles": None}
    assert "ships no threshold" in format_per_character(report)


@pytest.mark.slow  # a subprocess end to end; `make test-slow`
def test_cli_json_on_a_tiny_mnist(fitted_repo, tiny_mnist_root):
    out, _ = fitted_repo
    result = subprocess.run([sys.executable, "-m", "export.evaluate", str(out), "--data-dir", str(tiny_mnist_root),
                             "--count", "8", "--no-fashion", "--no-fonts", "--json",
                             "--histogram", str(out.parent / "h.png")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["digits"]["count"] == 128
    assert set(report["unknown_sets"]) == {"uniform_noise", "gaussian_noise", "blank", "letters",
                                           "letters_lookalikes"}
    assert list(report["per_character"]) == ["letters"] and list(report["fonts"]) == ["letters"]
    assert any("--no-fashion" in n for n in report["notes"]) and any("--no-fonts" in n for n in report["notes"])
    assert (out.parent / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_goes_on_when_no_font_package_can_be_had(fitted_repo, tiny_mnist_root, tmp_path, monkeypatch, capsys):
    """Every font package failing to fetch: one note a package and one a set left out; the rest is measured."""
    from export import unknown_fonts
    from export.evaluate import main
    from export.unknowns import FONT_SETS

    def fetch(*args, **kwargs):
        raise OSError("apt-get download failed: E: Unable to locate package")

    monkeypatch.setenv("LSOFTMAX_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(unknown_fonts, "fetch_package_files", fetch)
    monkeypatch.setattr(unknown_fonts, "download", fetch)
    out, _ = fitted_repo
    code = main([str(out), "--data-dir", str(tiny_mnist_root), "--count", "4", "--no-fashion", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["unknown_sets"]) == {"uniform_noise", "gaussian_noise", "blank", "letters",
                                           "letters_lookalikes"}
    notes = report["notes"]
    packages = {p for name in FONT_SETS for p in unknown_fonts.SET_FONTS[name]}
    assert sum("going on without it" in n for n in notes) == len(packages)
    assert [n.split()[0] for n in notes if "left out:" in n] == list(FONT_SETS)


def test_cli_per_character_prints_the_table(fitted_repo, tiny_mnist_root, capsys):
    from export.evaluate import main

    out, _ = fitted_repo
    assert main([str(out), "--data-dir", str(tiny_mnist_root), "--count", "70", "--no-fashion", "--no-fonts",
                 "--per-character"]) == 0
    text = capsys.readouterr().out
    assert "letters_lookalikes" in text and "accepted at the threshold, per character  letters (n=1-2)" in text
    assert "\nO ~0 " in text and "\nA " in text


def test_cli_missing_repository_is_one_line(tmp_path, tiny_mnist_root, capsys):
    from export.evaluate import main

    code = main([str(tmp_path / "nope"), "--data-dir", str(tiny_mnist_root), "--count", "4", "--no-fashion"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_inputs_without_ink_are_below_any_threshold_in_both_graphs(fitted_repo):
    """All black, a faint wash and a 2x2 dot (less ink than any MNIST training digit has) score NO_INK_SCORE in
    TorchScript and ONNX alike; a digit keeps its detector score."""
    import onnxruntime as ort

    from export.inference_module import NO_INK_SCORE

    out, manifest = fitted_repo
    blank = np.zeros((4, 1, 28, 28), np.uint8)
    blank[1] = 3  # a faint wash: 784 * 3 / 255 = 9.2 pixels' worth of ink
    blank[2, 0, 10:12, 10:12] = 255
    blank[3] = synthetic_digits(1, seed=1)[0][0]
    session = ort.InferenceSession(str(out / "lsoftmax_mnist_onnx/1/model.onnx"), providers=["CPUExecutionProvider"])
    onnx_scores = session.run(["known_score"], {"image": blank})[0]
    module = torch.jit.load(str(out / "lsoftmax_mnist_torchscript/1/model.pt"))
    script_scores = module(torch.from_numpy(blank))[2].numpy()
    for scores in (onnx_scores, script_scores):
        assert list(scores[:3]) == [NO_INK_SCORE] * 3
        assert scores[3] > NO_INK_SCORE
