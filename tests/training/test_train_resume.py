"""`python -m training --resume` on the tiny synthetic MNIST: bit-exact after an interruption, extending a run
with --epochs, conflicting flags, nothing to do, the metrics log rewritten by rename, and bad checkpoints."""

import os
import random
import re
import shutil
import stat

import pytest
import torch

import training.resume as resume_mod
import training.train as train_mod
from support import make_checkpoint
from training.checkpoint import CheckpointError, load_checkpoint
from training.train import main
from train_support import (SMALL, THREE_EPOCHS, assert_one_line_error, last, metrics,  # noqa: F401
                           one_thread, train, unbroken_run)  # fixtures: one_thread, unbroken_run


# --- resume -------------------------------------------------------------------------------------

@pytest.mark.slow  # three training runs; resume stays covered by the extend and conflict tests
def test_interrupted_and_resumed_run_matches_the_unbroken_one(unbroken_run, tiny_mnist_root, tmp_path,
                                                              monkeypatch, capsys):
    """Ctrl-C two iterations into epoch 3 (after a kill that left a half-written log line), then --resume:
    same weights, optimizer state and metrics as the unbroken run, bit for bit, on CPU."""
    real_epoch = train_mod.train_one_epoch

    def interrupted(batches, after):
        for i, batch in enumerate(batches):
            if i == after:
                raise KeyboardInterrupt
            yield batch

    def flaky_epoch(model, batches, *rest, **options):
        desc = next(arg for arg in rest if isinstance(arg, str))  # the progress description, "epoch E/N"
        if desc.startswith("epoch 3/"):
            batches = interrupted(batches, after=2)
        return real_epoch(model, batches, *rest, **options)

    monkeypatch.setattr(train_mod, "train_one_epoch", flaky_epoch)
    assert train(tiny_mnist_root, tmp_path, *THREE_EPOCHS) == 130
    assert "--resume" in capsys.readouterr().err
    assert last(tmp_path)["epoch"] == 2 and len(metrics(tmp_path)) == 2
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.0')  # a line cut short by a kill
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)

    # Only runtime flags on the command line: the run's own config comes from last.pt.
    assert main(["--out", str(tmp_path), "--resume", "--data-dir", str(tiny_mnist_root), "--device", "cpu",
                 "--progress", "off"]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed, unbroken = last(tmp_path), last(unbroken_run)
    assert resumed["epoch"] == 3
    for key, value in unbroken["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for slot, state in unbroken["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][slot]["momentum_buffer"], state["momentum_buffer"])
    assert resumed["beta_schedule"] == unbroken["beta_schedule"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics(tmp_path)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in metrics(unbroken_run)]


@pytest.fixture(scope="module")
def one_epoch_run(tiny_mnist_root, tmp_path_factory):
    """A finished SMALL run (1 epoch of 2 iterations, fast net: one-cycle lr, caffe beta with its default gamma).
    Tests resume copies of it."""
    out = tmp_path_factory.mktemp("one_epoch")
    assert train(tiny_mnist_root, out, *SMALL) == 0
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(folder):
    """Name -> (bytes, mtime_ns, inode) of every file in `folder`."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_resume_with_more_epochs_extends_a_finished_run(one_epoch_run, tiny_mnist_root, tmp_path, capsys):
    """--resume --epochs 2 on a finished 1-epoch run trains epoch 2 and records the new length. One-cycle lr and
    the default caffe beta are sized by the run's length: they are rebuilt for 2 epochs and continue at the
    iteration reached, so epoch 2 starts and ends with the lr, momentum and beta of an unbroken 2-epoch run."""
    out = copy_run(one_epoch_run, tmp_path)
    assert train(tiny_mnist_root, tmp_path / "unbroken", *SMALL, "--epochs", "2") == 0
    capsys.readouterr()
    assert train(tiny_mnist_root, out, "--resume", "--epochs", "2") == 0
    printed = capsys.readouterr().out
    assert "run resized from 1 to 2 epochs" in printed and "at epoch 2/2" in printed
    rows, reference = metrics(out), metrics(tmp_path / "unbroken")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == metrics(one_epoch_run)[0]
    assert (rows[1]["lr"], rows[1]["beta"]) == (reference[1]["lr"], reference[1]["beta"])
    ckpt, ref = last(out), last(tmp_path / "unbroken")
    assert ckpt["epoch"] == 2 and ckpt["config"]["train_args"]["epochs"] == 2
    assert ckpt["config"]["train_args"] == ref["config"]["train_args"] | {"out": str(out), "resume": True}
    assert ckpt["lr_scheduler"]["total_steps"] == 4
    assert ckpt["lr_scheduler"]["_last_lr"] == ref["lr_scheduler"]["_last_lr"]
    group, ref_group = ckpt["optimizer"]["param_groups"][0], ref["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (ref_group["lr"], ref_group["momentum"])
    assert ckpt["beta_schedule"] == ref["beta_schedule"] == {"iteration": 4}
    assert ckpt["model"]["head.beta"].item() == ref["model"]["head.beta"].item()
    # The new length is the run's own now: a second plain --resume finds it finished.
    assert train(tiny_mnist_root, out, "--resume") == 0
    assert "already holds epoch 2 of the run's 2" in capsys.readouterr().out


def test_resume_with_a_conflicting_flag_is_a_usage_error(one_epoch_run, tiny_mnist_root, tmp_path, capsys):
    """A flag that describes the run must repeat the checkpoint's value on --resume (exit 2, nothing written);
    the same value, and the how-to-run flags, are fine."""
    out = copy_run(one_epoch_run, tmp_path)
    before = snapshot(out)
    assert train(tiny_mnist_root, out, "--resume", "--epochs", "2", "--margin", "4") == 2
    assert_one_line_error(capsys.readouterr().err, "--margin 4 conflicts with the checkpoint's --margin 2",
                          str(out / "last.pt"), "resume keeps the run's own flags")
    assert train(tiny_mnist_root, out, "--resume", "--lr", "0.5", "--lr-schedule", "constant", "--model", "fast") == 2
    assert_one_line_error(capsys.readouterr().err, "--lr 0.5 conflicts with the checkpoint's --lr 0.1",
                          "--lr-schedule constant conflicts with the checkpoint's --lr-schedule onecycle")
    assert train(tiny_mnist_root, out, "--resume", "--beta-gamma", "0.01") == 2
    assert_one_line_error(capsys.readouterr().err,
                          "--beta-gamma 0.01 conflicts with the checkpoint's --beta-gamma (unset)")
    assert snapshot(out) == before
    # The saved values given again, and runtime flags (--progress on, --vis) that differ from the first run's.
    assert train(tiny_mnist_root, out, "--resume", *SMALL, "--epochs", "2", "--lr", "0.1", "--beta-base", "1000",
                 "--progress", "on", "--vis") == 0
    assert last(out)["epoch"] == 2 and (out / "features.png").is_file()
    capsys.readouterr()
    assert train(tiny_mnist_root, out, "--resume", "--epochs", "1") == 2
    assert_one_line_error(capsys.readouterr().err, "--epochs 1 is below the 2 epoch(s)", str(out / "last.pt"))


def test_explicit_flags_are_those_on_the_command_line():
    assert train_mod.explicit_flags(["--resume", "--margin", "4", "--lr=0.1", "--epo", "3"]) == {
        "resume", "margin", "lr", "epochs"}
    assert train_mod.explicit_flags([]) == set()


def test_resuming_a_finished_run_does_nothing(one_epoch_run, tiny_mnist_root, tmp_path, capsys):
    """No larger --epochs: say so (which checkpoint, how far it got, how to extend it), exit 0, touch nothing."""
    out = copy_run(one_epoch_run, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr"')  # even a stray line past the checkpoint stays as it is
    before = snapshot(out)
    for extra in ([], ["--epochs", "1"], ["--margin", "2"]):
        assert train(tiny_mnist_root, out, "--resume", *extra) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith(f"nothing to do: {out / 'last.pt'} already holds epoch 1 of the run's 1")
        assert "--epochs 2" in captured.out and captured.err == ""
        assert "training" not in captured.out
    assert snapshot(out) == before


def test_resume_rewrites_the_metrics_log_through_a_rename(tmp_path, monkeypatch):
    """Dropping log lines past the checkpoint writes a new file and renames it over the log (then fsyncs the
    folder): the old file is never rewritten in place, so a crash leaves one log or the other, whole."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "lr": 0.0')
    os.chmod(log, 0o640)
    os.link(log, tmp_path / "old")  # a second name for the old file: its bytes must stay as they were
    synced = []
    monkeypatch.setattr(resume_mod, "fsync_dir", synced.append)
    resume_mod.truncate_metrics(log, 2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert (tmp_path / "old").read_text().endswith('{"epoch": 3, "lr": 0.0')
    assert log.stat().st_ino != (tmp_path / "old").stat().st_ino
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert synced == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "old"]

    # A failure before the rename leaves the old log whole and no temp file behind.
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    def no_rename(*args):
        raise OSError("simulated")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated"):
        resume_mod.truncate_metrics(log, 1)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "old"]


def test_checkpoint_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    import training.checkpoint as checkpoint

    calls = []
    real = checkpoint.fsync_dir
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda path: calls.append((path, (tmp_path / "x.pt").exists())))
    checkpoint.save_checkpoint({"config": {}, "model": {}}, tmp_path / "x.pt")
    assert calls == [(tmp_path, True)]  # the folder, after the rename
    real(tmp_path)  # a real directory fsync works here


def test_resume_without_a_checkpoint(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--resume"]) != 0
    assert_one_line_error(capsys.readouterr().err, str(tmp_path / "last.pt"), "no such checkpoint")

def test_resume_from_a_corrupt_checkpoint_names_the_file(unbroken_run, tmp_path, capsys):
    """Random bytes (the unpickler fails on them in many ways: IndexError, KeyError, ...), an empty file and
    a checkpoint cut in half all give one CheckpointError line naming the file."""
    whole = (unbroken_run / "last.pt").read_bytes()
    corrupt = [random.Random(seed).randbytes(4096) for seed in range(200)] + [b"", whole[: len(whole) // 2]]
    for payload in corrupt:
        (tmp_path / "last.pt").write_bytes(payload)
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "last.pt"))) as exc:
            load_checkpoint(tmp_path / "last.pt")
        assert "\n" not in str(exc.value)
    assert main(["--out", str(tmp_path), "--resume"]) != 0
    assert_one_line_error(capsys.readouterr().err, str(tmp_path / "last.pt"), "not a readable")

def test_resume_from_a_checkpoint_without_training_state(tmp_path, capsys):
    """A weights-only checkpoint (what export reads) cannot continue a run: say so, do not crash."""
    make_checkpoint(tmp_path / "last.pt")
    assert main(["--out", str(tmp_path), "--resume"]) != 0
    assert_one_line_error(capsys.readouterr().err, str(tmp_path / "last.pt"), "optimizer")
