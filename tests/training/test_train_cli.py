"""`python -m training` end to end on the tiny synthetic MNIST: outputs, every flag taking effect, one-line
errors, and the feature plots (resume: test_train_resume.py)."""

import os
import stat
import subprocess
import sys

import pytest
import torch

import training.train as train_mod
from support import make_checkpoint
from training import visualize
from training.checkpoint import load_checkpoint, rebuild_model
from training.train import main
from train_support import (METRIC_KEYS, PNG_MAGIC, SMALL, assert_one_line_error, last, metrics,  # noqa: F401
                           one_thread, train, unbroken_run, weights_differ)  # fixtures: one_thread, unbroken_run


# --- outputs ------------------------------------------------------------------------------------

def test_writes_checkpoints_and_metrics(unbroken_run):
    rows = metrics(unbroken_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(set(r) == METRIC_KEYS for r in rows)
    assert rows[0]["test_acc"] < rows[-1]["test_acc"] and rows[-1]["test_acc"] >= 90.0  # it learns the squares
    assert rows[0]["train_loss"] > rows[-1]["train_loss"]
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(unbroken_run / name, weights_only=True)
        assert ckpt["epoch"] == 3 and ckpt["metrics"] == rows[-1]
        assert {"model", "optimizer", "lr_scheduler", "beta_schedule", "config", "best"} <= set(ckpt)
        config = ckpt["config"]
        assert (config["model"], config["margin"], config["embedding_dim"]) == ("fast", 3, 128)
        assert config["train_args"]["seed"] == 5
    assert torch.load(unbroken_run / "best.pt", weights_only=True)["selected_by"] == "final epoch"
    # Checkpoints get the permissions of any other file written there (not mkstemp's 0600), no temp files left.
    assert stat.S_IMODE(os.stat(unbroken_run / "last.pt").st_mode) == stat.S_IMODE(
        os.stat(unbroken_run / "metrics.jsonl").st_mode)
    assert sorted(p.name for p in unbroken_run.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_checkpoint_rebuilds_the_trained_net(unbroken_run, tiny_mnist_root):
    """rebuild_model needs only the file, and the rebuilt net scores the logged test accuracy."""
    from training.data import load_split, normalize

    ckpt = load_checkpoint(unbroken_run / "last.pt")
    model = rebuild_model(ckpt)
    assert not model.training and model.head.margin == 3
    images, labels = load_split(tiny_mnist_root, train=False)
    with torch.no_grad():
        acc = 100.0 * (model(normalize(images[:128])).argmax(1) == labels[:128]).float().mean().item()
    assert acc == pytest.approx(ckpt["metrics"]["test_acc"])


def test_a_fresh_run_replaces_an_old_metrics_log(tiny_mnist_root, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert train(tiny_mnist_root, tmp_path, *SMALL) == 0
    assert len(metrics(tmp_path)) == 1


# --- every flag takes effect --------------------------------------------------------------------

@pytest.mark.slow  # two training runs (~2 s); the slow suite runs it
def test_weight_decay_reaches_the_optimizer_and_changes_the_result(tiny_mnist_root, tmp_path):
    """The seed parsed --weight-decay and never used it (docs/architecture.md §6)."""
    runs = {}
    for wd in ("0", "0.05"):
        assert train(tiny_mnist_root, tmp_path / wd, *SMALL, "--weight-decay", wd, "--lr-schedule", "constant") == 0
        runs[wd] = last(tmp_path / wd)
        assert all(g["weight_decay"] == float(wd) for g in runs[wd]["optimizer"]["param_groups"])
    assert weights_differ(runs["0"], runs["0.05"])
    assert runs["0"]["config"]["train_args"]["weight_decay"] == 0.0


@pytest.mark.slow  # two training runs (~2 s); the slow suite runs it
def test_momentum_reaches_the_optimizer_and_changes_the_result(tiny_mnist_root, tmp_path):
    """Constant lr: the flag is SGD's momentum. One-cycle (the fast net's default) cycles momentum, and
    the cycle must be centred on the flag rather than on OneCycleLR's own fixed 0.85..0.95."""
    assert train(tiny_mnist_root, tmp_path / "c", *SMALL, "--momentum", "0.3", "--lr-schedule", "constant") == 0
    assert last(tmp_path / "c")["optimizer"]["param_groups"][0]["momentum"] == 0.3
    runs = {}
    for momentum in ("0.5", "0.9"):
        assert train(tiny_mnist_root, tmp_path / momentum, *SMALL, "--momentum", momentum) == 0
        runs[momentum] = last(tmp_path / momentum)
        assert runs[momentum]["config"]["train_args"]["lr_schedule"] == "onecycle"
        group, m = runs[momentum]["optimizer"]["param_groups"][0], float(momentum)
        assert (group["base_momentum"], group["max_momentum"]) == pytest.approx((m - 0.05, m + 0.05))
        assert m - 0.05 <= group["momentum"] <= m + 0.05
    assert weights_differ(runs["0.5"], runs["0.9"])


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
@pytest.mark.parametrize("flags, lrs", [
    (["--lr-schedule", "constant", "--lr", "0.02"], [0.02, 0.02]),
    (["--lr-schedule", "multistep", "--lr", "0.05", "--milestones", "2"], [0.05, 0.005]),  # 2 iterations/epoch
    (["--lr-schedule", "multistep", "--lr", "0.05", "--milestones", "1,2"], [0.05, 0.05 * 0.01]),
    (["--lr-schedule", "onecycle", "--lr", "0.3"], [0.3 / 20, None]),  # starts at max_lr / div_factor
])
def test_lr_and_its_schedule(tiny_mnist_root, tmp_path, flags, lrs):
    assert train(tiny_mnist_root, tmp_path, *SMALL, "--epochs", "2", *flags) == 0
    logged = [r["lr"] for r in metrics(tmp_path)]
    assert logged[0] == pytest.approx(lrs[0])
    if lrs[1] is not None:
        assert logged[1] == pytest.approx(lrs[1])
    else:
        assert last(tmp_path)["optimizer"]["param_groups"][0]["max_lr"] == 0.3


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
def test_batch_size_sets_iterations_per_epoch(tiny_mnist_root, tmp_path):
    for batch, iterations in (("32", 4), ("64", 2), ("100", 2)):
        assert train(tiny_mnist_root, tmp_path / batch, *SMALL, "--batch-size", batch) == 0
        assert last(tmp_path / batch)["beta_schedule"]["iteration"] == iterations


def caffe(base, gamma, power, iteration):
    return base * (1 + gamma * iteration) ** -power


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
@pytest.mark.parametrize("flags, betas", [
    (["--beta-schedule", "constant", "--beta-base", "7"], [7.0, 7.0, 7.0]),
    (["--beta-schedule", "exp", "--beta-start", "50", "--beta-decay", "0.5"], [50.0, 12.5, 3.125]),
    (["--beta-schedule", "exp", "--beta-start", "50", "--beta-decay", "0.5", "--beta-min", "20"], [50.0, 20.0, 20.0]),
    (["--beta-schedule", "caffe", "--beta-base", "100", "--beta-gamma", "0.5", "--beta-power", "2"],
     [100.0, 25.0, caffe(100, 0.5, 2, 4)]),
    (["--beta-schedule", "caffe", "--beta-base", "100"], [caffe(100, 0.1125, 35, i) for i in (0, 2, 4)]),
])
def test_beta_flags_change_the_logged_beta(tiny_mnist_root, tmp_path, flags, betas):
    """beta is logged at the start of each of the 2 epochs (2 iterations each), and the layer's buffer
    holds the value after the last iteration. The caffe default gamma (2.5e-5 * 18000 / 4 = 0.1125)
    squeezes the paper's 18k-iteration curve into this run's 4 iterations."""
    assert train(tiny_mnist_root, tmp_path, *SMALL, "--epochs", "2", *flags) == 0
    assert [r["beta"] for r in metrics(tmp_path)] == pytest.approx(betas[:2])
    assert last(tmp_path)["model"]["head.beta"].item() == pytest.approx(betas[2], rel=1e-6)


def test_seed_changes_the_weights_and_repeats_exactly(tiny_mnist_root, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train(tiny_mnist_root, tmp_path / name, *SMALL, "--seed", seed) == 0
    a, b, c = (last(tmp_path / n) for n in "abc")
    assert not weights_differ(a, b)
    assert weights_differ(a, c)


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
def test_train_and_test_subsets(tiny_mnist_root, tmp_path, capsys):
    assert train(tiny_mnist_root, tmp_path, *SMALL, "--train-subset", "96", "--test-subset", "40") == 0
    assert "96 train / 40 test images" in capsys.readouterr().out
    assert last(tmp_path)["beta_schedule"]["iteration"] == 2  # ceil(96 / 64)
    assert train(tiny_mnist_root, tmp_path / "all", *SMALL, "--train-subset", "0", "--test-subset", "0") == 0
    assert "512 train / 128 test images" in capsys.readouterr().out


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
def test_amp_and_progress(tiny_mnist_root, tmp_path, capsys):
    """--amp on runs the forward in bf16 autocast even on CPU (other numbers); --progress on draws tqdm bars."""
    assert train(tiny_mnist_root, tmp_path / "fp32", *SMALL) == 0
    assert "epoch 1/1:" not in capsys.readouterr().err
    assert train(tiny_mnist_root, tmp_path / "bf16", *SMALL, "--amp", "on", "--progress", "on") == 0
    assert "epoch 1/1:" in capsys.readouterr().err  # the bar's description
    assert weights_differ(last(tmp_path / "fp32"), last(tmp_path / "bf16"))


def test_channels_last_flag_sets_the_memory_format(tiny_mnist_root, tmp_path, monkeypatch):
    """Default (auto) trains in NHWC; --channels-last off keeps NCHW. The flag reaches the epoch loop."""
    seen = []
    real_epoch = train_mod.train_one_epoch

    def spy(model, *args, **kwargs):
        conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]  # C_in > 1: unambiguous
        seen.append((args[-1], conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return real_epoch(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    assert train(tiny_mnist_root, tmp_path / "nhwc", *SMALL) == 0
    assert train(tiny_mnist_root, tmp_path / "nchw", *SMALL, "--channels-last", "off") == 0
    assert seen == [(True, True), (False, False)]


def test_cache_dir_is_where_the_data_comes_from(tmp_path, monkeypatch, capsys):
    """Without --data-dir the run reads the verified cache under --cache-dir (here a tiny one whose
    checksums stand in for MNIST's), and does not fetch anything when it is complete."""
    from support import write_synthetic_mnist
    from training import data

    raw = write_synthetic_mnist(tmp_path / "cache", n_train=64, n_test=32) / "MNIST" / "raw"
    (raw / data.COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(data, "RAW_FILES", {n: data.sha256_file(raw / n) for n in data.RAW_FILES})
    monkeypatch.setattr(data, "_build_from_hub", lambda *a: pytest.fail("tried to fetch MNIST"))
    assert main(["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--epochs", "1", "--progress", "off"]) == 0
    assert "64 train / 32 test images" in capsys.readouterr().out


@pytest.mark.slow  # a training run per case (1-5 s each): the slow suite runs them
def test_val_size_picks_best_by_val_acc_and_vis_writes_features(tiny_mnist_root, tmp_path, capsys):
    """best.pt is chosen on a held-out split of the training set, never on the test set."""
    assert train(tiny_mnist_root, tmp_path, *SMALL, "--epochs", "3", "--val-size", "64", "--vis") == 0
    assert "128 train / 64 test images" in capsys.readouterr().out
    rows = metrics(tmp_path)
    assert all(set(r) == METRIC_KEYS | {"val_acc"} for r in rows)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["selected_by"] == "val_acc"
    top = max(r["val_acc"] for r in rows)
    assert best["epoch"] == max(r["epoch"] for r in rows if r["val_acc"] == top)  # later epoch wins ties
    assert (tmp_path / "features.png").read_bytes()[:8] == PNG_MAGIC
    # The checkpoint says which training images were held out (the last 64 of 512), with their digest.
    from training.data import load_split
    from training.train import held_out_digest

    held = best["config"]["held_out"]
    assert (held["split"], held["start"], held["stop"], held["count"]) == ("train", 448, 512, 64)
    images, labels = load_split(tiny_mnist_root, train=True)
    assert held["sha256"] == held_out_digest(images[448:], labels[448:])
    assert best["config"]["train_args"]["val_size"] == 64


def test_val_size_auto_holds_out_5000_of_mnist_and_nothing_of_a_tiny_set(tiny_mnist_root, tmp_path, capsys):
    from training.options import get_args_parser, resolve_val_size

    assert get_args_parser().parse_args([]).val_size == "auto"
    assert resolve_val_size("auto", 60000) == 5000 and resolve_val_size("auto", 512) == 0
    assert resolve_val_size(0, 60000) == 0 and resolve_val_size(7, 512) == 7
    assert train(tiny_mnist_root, tmp_path, *SMALL) == 0
    assert "held out" not in capsys.readouterr().out
    config = last(tmp_path)["config"]
    assert config["held_out"] is None and config["train_args"]["val_size"] == 0


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--margin", "0"], "must be >= 1"),
    (["--margin", "two"], "expected an integer"),
    (["--train-subset", "-3"], "expected an integer >= 0"),
])
def test_bad_flags_are_usage_errors(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err.splitlines()[-1] and fragment in err.splitlines()[-1]





@pytest.mark.parametrize("flags, fragment", [
    (["--val-size", "512"], "leaves no training images"),
    (["--lr-schedule", "multistep", "--milestones", "10,x"], "--milestones"),
    pytest.param(["--device", "cuda"], "--device cuda requested",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_values_found_at_run_time(tiny_mnist_root, tmp_path, capsys, flags, fragment):
    assert train(tiny_mnist_root, tmp_path, *SMALL, *flags) != 0
    assert_one_line_error(capsys.readouterr().err, fragment)


def test_a_diverging_run_stops_with_a_one_line_error(tiny_mnist_root, tmp_path, capsys):
    """The loss is checked every FINITE_CHECK_EVERY iterations and at the end of each epoch, not each step."""
    code = train(tiny_mnist_root, tmp_path / "nan", *SMALL, "--lr", "1e30", "--lr-schedule", "constant")
    assert code == 1  # a runtime failure, not a usage error
    assert_one_line_error(capsys.readouterr().err, "non-finite by iteration 2", "epoch 1/1")
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_unwritable_out(tiny_mnist_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train(tiny_mnist_root, blocker / "run", *SMALL) != 0
    assert_one_line_error(capsys.readouterr().err, str(blocker / "run"), "not writable")


def test_data_dir_with_missing_files(tmp_path, capsys):
    assert train(tmp_path / "empty", tmp_path / "run", *SMALL) != 0
    assert_one_line_error(capsys.readouterr().err, "missing", "train-images-idx3-ubyte")


@pytest.mark.slow  # a subprocess end to end; `make test-slow`
def test_module_entry_points(tiny_mnist_root, tmp_path):
    """`python -m training` in a fresh process: --help shows the defaults; an error is one line, exit != 0."""
    help_text = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for shown in ("(default: 0.0005)", "(default: 0.9)", "(default: fast)", "paper 77", "fast 'onecycle'",
                  "(default: caffe)", "(default: 0)"):
        assert shown in help_text, shown
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "training", "--out", str(blocker / "run"),
                             "--data-dir", str(tiny_mnist_root)], capture_output=True, text=True)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, "not writable")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_with_amp_gives_a_cpu_loadable_checkpoint(tiny_mnist_root, tmp_path):
    """--device cuda (bf16 autocast + channels_last by default) trains, and its checkpoint rebuilds on CPU."""
    out = tmp_path / "cuda"
    assert main(["--data-dir", str(tiny_mnist_root), "--out", str(out), "--device", "cuda", "--progress", "off",
                 "--model", "fast", "--margin", "2", "--epochs", "3", "--batch-size", "64"]) == 0
    assert metrics(out)[-1]["test_acc"] >= 90.0
    ckpt = load_checkpoint(out / "last.pt")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert rebuild_model(ckpt)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_epoch_reads_back_from_the_gpu_a_fixed_number_of_times_not_per_step():
    """Each read-back (.item(), float(tensor)) stalls the CPU until the GPU drains, so the CPU cannot queue
    work ahead; an epoch of 30 iterations must sync a few times in all, not once per iteration."""
    import warnings

    from training.data import Batches
    from training.lsoftmax import build_beta_schedule
    from training.models import build_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (30 * 32, 1, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (30 * 32,), device=device)
    model = build_model("fast", 4).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    beta = build_beta_schedule("caffe", model.head, base=1000.0, gamma=1e-3, power=35.0, beta_min=0.0)
    batches = Batches(images, labels, 32, shuffle=True)
    args = (optimizer, scheduler, beta, device, True, False, "epoch 1/1", True)
    train_mod.train_one_epoch(model, batches, *args)  # warm-up: cudnn picks its kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_mod.train_one_epoch(model, batches, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 4, [str(w.message) for w in syncs[:5]]


# --- feature plots ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["vis", "fast"])
def test_visualize_writes_a_png(model, tiny_mnist_root, tmp_path):
    """2-D features are drawn as they are; 128-D ones through a PCA projection."""
    ckpt = make_checkpoint(tmp_path / f"{model}.pt", model=model)
    png = tmp_path / "x.png"
    assert visualize.main([str(ckpt), "--out", str(png), "--data-dir", str(tiny_mnist_root)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    features = visualize.compute_features(rebuild_model(load_checkpoint(ckpt)), torch.zeros(3, 1, 28, 28,
                                                                                            dtype=torch.uint8))
    xy, axis = visualize.project_2d(features)
    assert xy.shape == (3, 2) and axis == ("feature" if model == "vis" else "PC")


@pytest.mark.slow  # a subprocess end to end; `make test-slow`
def test_visualize_module(tiny_checkpoint, tiny_mnist_root, tmp_path):
    png = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "training.visualize", str(tiny_checkpoint), "--out", str(png),
                             "--data-dir", str(tiny_mnist_root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_visualize_missing_checkpoint(tmp_path, capsys):
    assert visualize.main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.png")]) != 0
    assert_one_line_error(capsys.readouterr().err, "nope.pt")
