"""`python -m training` with the training negatives (outlier exposure): what the checkpoint records, the recipes'
defaults, resume, and the paper reproduction training without them."""

import pytest
import torch

import training.train as train_mod
from training.checkpoint import save_checkpoint
from training.options import get_args_parser, resolve_args
from training.reproduce import PAPER_RECIPE_FLAGS
from train_support import SMALL, assert_one_line_error, last, metrics, train  # noqa: F401

WITH_NEGATIVES = [*SMALL, "--negatives", "on"]  # the later flag wins
THREE = ["--model", "fast", "--margin", "3", "--epochs", "3", "--batch-size", "64", "--train-subset", "256",
         "--test-subset", "64", "--seed", "2", "--negatives", "on", "--capture-augment", "on"]


def test_the_demo_recipe_trains_beside_negatives_and_the_papers_recipes_do_not():
    parser = get_args_parser()
    args = resolve_args(parser.parse_args(["--model", "fast"]))  # make demo's
    assert (args.negatives, args.capture_augment) == ("on", "on")
    for net in ("paper", "vis"):
        args = resolve_args(parser.parse_args(["--model", net]))
        assert (args.negatives, args.capture_augment) == ("off", "off")
    args = resolve_args(parser.parse_args(["--model", "fast", "--negatives", "off", "--capture-augment", "off"]))
    assert (args.negatives, args.capture_augment) == ("off", "off")
    assert PAPER_RECIPE_FLAGS == ("--negatives", "off", "--capture-augment", "off")


def test_a_run_with_negatives_records_them_and_one_without_records_none(tiny_mnist_root, tmp_path, capsys):
    assert train(tiny_mnist_root, tmp_path / "on", *WITH_NEGATIVES) == 0
    out = capsys.readouterr().out
    assert "training negatives" in out
    record = last(tmp_path / "on")["config"]["negatives"]
    assert record["generator"] == "training.negatives" and record["count"] == 2 * 16 and record["per_batch"] == 16
    assert record["weight"] == 0.5 and record["seed"] == 0
    assert train(tiny_mnist_root, tmp_path / "off", *SMALL) == 0
    assert "training negatives" not in capsys.readouterr().out
    assert last(tmp_path / "off")["config"]["negatives"] is None


def test_negatives_change_what_the_net_learns(tiny_mnist_root, tmp_path):
    assert train(tiny_mnist_root, tmp_path / "on", *WITH_NEGATIVES) == 0
    assert train(tiny_mnist_root, tmp_path / "off", *SMALL) == 0
    on, off = last(tmp_path / "on")["model"], last(tmp_path / "off")["model"]
    assert any(not torch.equal(on[k], off[k]) for k in on)


def test_a_bad_ratio_is_a_usage_error(tiny_mnist_root, tmp_path, capsys):
    assert train(tiny_mnist_root, tmp_path, *WITH_NEGATIVES, "--negative-ratio", "0") == 2
    assert_one_line_error(capsys.readouterr().err, "--negative-ratio")


def test_an_interrupted_run_with_negatives_resumes_to_the_unbroken_one(tiny_mnist_root, tmp_path, monkeypatch,
                                                                       capsys):
    """The negatives' pool and their order depend only on (seed, epoch): a resumed run sees the same ones."""
    assert train(tiny_mnist_root, tmp_path / "unbroken", *THREE) == 0
    real_epoch = train_mod.train_one_epoch

    def interrupted_in_epoch_3(model, batches, *rest, **kwargs):
        if any(isinstance(a, str) and a.startswith("epoch 3/") for a in rest):
            raise KeyboardInterrupt
        return real_epoch(model, batches, *rest, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted_in_epoch_3)
    assert train(tiny_mnist_root, tmp_path / "resumed", *THREE) == 130
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    assert train_mod.main(["--out", str(tmp_path / "resumed"), "--resume", "--data-dir", str(tiny_mnist_root),
                           "--device", "cpu", "--progress", "off"]) == 0
    resumed, unbroken = last(tmp_path / "resumed"), last(tmp_path / "unbroken")
    for key, value in unbroken["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["config"]["negatives"] == unbroken["config"]["negatives"]


def test_a_checkpoint_from_before_negatives_resumes_without_them(tiny_mnist_root, tmp_path, capsys):
    assert train(tiny_mnist_root, tmp_path, *SMALL) == 0
    ckpt = last(tmp_path)
    del ckpt["config"]["train_args"]["negatives"], ckpt["config"]["negatives"]  # as written before they existed
    save_checkpoint(ckpt, tmp_path / "last.pt")
    capsys.readouterr()
    assert train_mod.main(["--out", str(tmp_path), "--resume", "--epochs", "2", "--data-dir", str(tiny_mnist_root),
                           "--device", "cpu", "--progress", "off"]) == 0
    assert "training negatives" not in capsys.readouterr().out
    assert last(tmp_path)["config"]["train_args"]["negatives"] == "off" and len(metrics(tmp_path)) == 2
