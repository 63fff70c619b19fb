"""Dataset loading: splits, normalization, IDX and CIFAR parsing, and refusal of malformed or malicious files."""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from correctnet.data import (
    DATASETS,
    DEFAULT_ROOTS,
    DataSplits,
    load_dataset,
    make_loader,
    read_cifar_batch,
    read_idx,
)
from correctnet.errors import ConfigError, DataFormatError, DataNotFoundError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


# ----------------------------------------------------------------------------- helpers


def idx_bytes(a: np.ndarray) -> bytes:
    head = bytes([0, 0, IDX_CODES[a.dtype], a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(a)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dir(root: Path, n_train: int = 50, n_test: int = 20, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / name, a, gz)
    return arrays


def cifar_batch(n: int, num_classes: int, seed: int, label_key: bytes) -> dict:
    """A batch in the official structure; channel c holds values around 60 * (c + 1) so the layout is checkable."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (n, 3, 32, 32)) + 60 * np.arange(1, 4)[None, :, None, None]
    batch = {b"batch_label": b"batch", b"data": img.astype(np.uint8).reshape(n, 3072),
             label_key: rng.integers(0, num_classes, n).tolist(), b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return batch


def dump(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes like Python 2's cPickle did for the official CIFAR files: str and bytes as BINSTRING, numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256
                   else pickle.BINSTRING + len(b).to_bytes(4, "little") + b)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def pixels(ds_x: torch.Tensor, s: DataSplits, scale: float) -> np.ndarray:
    """Undo the normalization: back to integer pixel values."""
    m, sd = torch.tensor(s.mean).view(1, -1, 1, 1), torch.tensor(s.std).view(1, -1, 1, 1)
    return torch.round((ds_x * sd + m) * scale).to(torch.int64).numpy()


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0)


def test_digits_splits_shapes_and_partition(digits: DataSplits) -> None:
    from sklearn.datasets import load_digits

    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797 and sizes[2] == round(0.2 * 1797)
    assert sizes[1] == round(0.1 * (1797 - sizes[2]))
    assert digits.name == "digits" and digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    for ds in (digits.train, digits.val, digits.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    # the three splits together are exactly the dataset (as a multiset of (image, label)): a disjoint partition
    raw = load_digits()
    want = sorted(im.astype(np.int64).tobytes() + bytes([t]) for im, t in zip(raw.images, raw.target))
    got = sorted(im.tobytes() + bytes([int(t)]) for ds in (digits.train, digits.val, digits.test)
                 for im, t in zip(pixels(ds.tensors[0], digits, 16.0)[:, 0], ds.tensors[1]))
    assert got == want


def test_digits_split_is_stratified(digits: DataSplits) -> None:
    counts = torch.bincount(digits.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38  # ~20% of ~180 per class


def test_digits_normalized_with_train_statistics(digits: DataSplits) -> None:
    x = digits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(correction=0)) - 1) < 1e-5
    assert len(digits.mean) == len(digits.std) == 1 and 0.2 < digits.mean[0] < 0.4
    assert abs(float(digits.test.tensors[0].mean())) < 0.1  # same transform, different sample


def test_digits_seed_determines_split(digits: DataSplits) -> None:
    again, other = load_dataset("digits", seed=0), load_dataset("DIGITS", seed=1)
    for a, b in zip((digits.train, digits.val, digits.test), (again.train, again.val, again.test)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert other.name == "digits" and len(other.test) == len(digits.test)
    assert not torch.equal(other.test.tensors[1], digits.test.tensors[1])


def test_val_fraction_bounds() -> None:
    assert len(load_dataset("digits", val_fraction=0.0).val) == 0
    for bad in (-0.1, 0.51, float("nan"), "0.1", None):
        with pytest.raises(ConfigError, match="val_fraction"):
            load_dataset("digits", val_fraction=bad)  # type: ignore[arg-type]
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ConfigError, match="seed"):
            load_dataset("digits", seed=bad)  # type: ignore[arg-type]


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError) as e:
        load_dataset("imagenet")
    assert "imagenet" in str(e.value) and all(name in str(e.value) for name in DATASETS)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path: Path, gz: bool, dtype: type) -> None:
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        a = a.astype(np.int64).clip(0).astype(np.uint8)
    b = read_idx(write_idx(tmp_path / "a-idx3", a, gz))
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and np.array_equal(a, b) and b.flags.writeable


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dataset(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = make_idx_dir(tmp_path / "d", gz=gz)
    s = load_dataset(name, tmp_path / "d", val_fraction=0.1, seed=3)
    assert s.name == name and s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (45, 5, 20)
    assert abs(float(s.train.tensors[0].mean())) < 1e-5 and abs(float(s.train.tensors[0].std(correction=0)) - 1) < 1e-4
    # test = official t10k in file order; train + val = a partition of the official train split
    assert np.array_equal(pixels(s.test.tensors[0], s, 255.0)[:, 0], arrays[IDX_NAMES[2]])
    assert np.array_equal(s.test.tensors[1].numpy(), arrays[IDX_NAMES[3]])
    both = np.concatenate([pixels(d.tensors[0], s, 255.0)[:, 0] for d in (s.train, s.val)])
    assert sorted(map(bytes, both.astype(np.uint8))) == sorted(map(bytes, arrays[IDX_NAMES[0]]))
    again = load_dataset(name, tmp_path / "d", val_fraction=0.1, seed=3)
    assert torch.equal(again.val.tensors[0], s.val.tensors[0])
    other = load_dataset(name, str(tmp_path / "d"), val_fraction=0.1, seed=4)
    assert not torch.equal(other.val.tensors[0], s.val.tensors[0])


def test_idx_malformed_headers_and_sizes(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    cases = {
        "bad_magic": b"\x12\x34" + good[2:],
        "bad_type": good[:2] + b"\x07" + good[3:],
        "zero_ndim": good[:3] + b"\x00",
        "short_header": good[:6],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        # claims 2^32-1 x 2^32-1 x 2^32-1 bytes: must be refused from the header, never allocated
        "absurd": bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3 + good[16:],
        "huge_but_capped": bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (1000).to_bytes(4, "big") * 2,
        "empty": b"",
    }
    for name, data in cases.items():
        for gz in (False, True):
            path = tmp_path / (name + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(data) if gz else data)
            with pytest.raises(DataFormatError) as e:
                read_idx(path)
            assert str(path) in str(e.value), name


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100)))
    for name, blob in {"cut": data[: len(data) // 2], "garbled": data[:10] + b"\xff" * 40 + data[50:]}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataFormatError, match=name):
            read_idx(tmp_path / name)


def test_idx_dataset_inconsistent_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_idx_dir(root)
    write_idx(root / IDX_NAMES[1], np.zeros(49, np.uint8))  # 50 images, 49 labels
    with pytest.raises(DataFormatError, match=IDX_NAMES[1]):
        load_dataset("mnist", root)
    write_idx(root / IDX_NAMES[1], np.full(50, 10, np.uint8))  # label 10 of a 10-class dataset
    with pytest.raises(DataFormatError, match="labels"):
        load_dataset("mnist", root)
    write_idx(root / IDX_NAMES[1], np.zeros((50, 1), np.uint8))  # labels with an extra dimension
    with pytest.raises(DataFormatError, match=IDX_NAMES[1]):
        load_dataset("mnist", root)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", missing)
    msg = str(e.value)
    assert str(missing) in msg and "fashion_mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "zalandoresearch/fashion-mnist" in msg and isinstance(e.value, FileNotFoundError)

    root = tmp_path / "partial"
    make_idx_dir(root, gz=True)
    (root / (IDX_NAMES[3] + ".gz")).unlink()
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", root)
    msg = str(e.value)
    assert str(root / IDX_NAMES[3]) in msg and str(root / (IDX_NAMES[3] + ".gz")) in msg
    assert IDX_NAMES[0] not in msg.split("missing in")[1].split(". ")[0]  # only the missing file is listed

    for name in ("cifar10", "cifar100"):
        with pytest.raises(DataNotFoundError, match="cs.toronto.edu/~kriz/cifar.html"):
            load_dataset(name, missing)
    assert set(DEFAULT_ROOTS) == set(DATASETS) - {"digits"}


# ----------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, name: str, n: int = 8, style: str = "py3-2") -> dict[str, dict]:
    """Official file layout; style: "py2" (like the real files), or "py3-<pickle protocol>"."""
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    key, classes = (b"labels", 10) if name == "cifar10" else (b"fine_labels", 100)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, f in enumerate(files):
        batches[f] = cifar_batch(n * (3 if name == "cifar100" and f == "train" else 1), classes, i, key)
        blob = py2_pickle(batches[f]) if style == "py2" else pickle.dumps(batches[f], protocol=int(style[4:]))
        (root / f).write_bytes(blob)
    return batches


@pytest.mark.parametrize("style", ["py2", "py3-2", f"py3-{pickle.HIGHEST_PROTOCOL}"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_dataset(tmp_path: Path, name: str, style: str) -> None:
    batches = write_cifar(tmp_path / name, name, style=style)
    s = load_dataset(name, tmp_path / name, val_fraction=0.25, seed=0)
    n_train = 40 if name == "cifar10" else 24
    assert (len(s.train), len(s.val), len(s.test)) == (n_train - n_train // 4, n_train // 4, 8)
    assert s.input_shape == (3, 32, 32) and s.num_classes == (10 if name == "cifar10" else 100)
    x = s.train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4)
    assert s.mean[0] < s.mean[1] < s.mean[2]  # planes stored R, G, B in that order (values ~80, ~140, ~200)
    test = batches["test_batch" if name == "cifar10" else "test"]
    assert np.array_equal(pixels(s.test.tensors[0], s, 255.0).reshape(8, 3072), test[b"data"])
    key = b"labels" if name == "cifar10" else b"fine_labels"
    assert s.test.tensors[1].tolist() == test[key]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_read_cifar_batch_all_protocols(tmp_path: Path, protocol: int) -> None:
    batch = cifar_batch(5, 10, 0, b"labels")
    x, y = read_cifar_batch(dump(tmp_path / "b", batch, protocol))
    assert type(x) is np.ndarray and x.flags.writeable and x.dtype == np.uint8 and x.shape == (5, 3, 32, 32)
    assert np.array_equal(x.reshape(5, -1), batch[b"data"]) and y.dtype == np.int64 and y.tolist() == batch[b"labels"]


class Payload:
    """Unpickling this calls func(*args): what a malicious dataset file would do."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def test_malicious_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # control: this payload really does write the marker when loaded with plain pickle
    pickle.loads(pickle.dumps(Payload(open, str(tmp_path / "control"), "w"))).close()
    assert (tmp_path / "control").exists()
    good = cifar_batch(4, 10, 0, b"labels")
    payloads = {
        "system": Payload(os.system, f"touch {marker}"),
        "open": Payload(open, str(marker), "w"),
        "eval": Payload(eval, f"open({str(marker)!r}, 'w')"),
        "nested": {**good, b"labels": [Payload(open, str(marker), "w")]},
        "getattr": Payload(getattr, "text", "upper"),
    }
    for name, obj in payloads.items():
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            path = dump(tmp_path / f"{name}-{protocol}", obj, protocol)
            with pytest.raises(DataFormatError) as e:
                read_cifar_batch(path)
            assert str(path) in str(e.value) and "refusing" in str(e.value)
    assert not marker.exists()


def test_resource_exhausting_pickles_are_refused(tmp_path: Path) -> None:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    big = (1 << 40,)
    cases = {
        "ndarray_new": Payload(np.ndarray, big),  # would allocate 1 TiB
        "reconstruct": {b"data": Payload(_reconstruct, np.ndarray, big, b"b"), b"labels": []},
        "object_dtype": {b"data": np.array([1, 2], dtype=object), b"labels": [0, 1]},
        "not_a_dict": [1, 2, 3],
        "no_data": {b"labels": [1]},
        "bad_shape": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
        "bad_dtype": {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
        "label_count": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
    }
    for name, obj in cases.items():
        path = dump(tmp_path / name, obj)
        with pytest.raises(DataFormatError, match=name):
            read_cifar_batch(path)
    # memo index 2^31-1: the C unpickler would allocate a 32 GiB memo table for this 9-byte file
    blobs = {"memo": b"\x80\x02K\x01r\xff\xff\xff\x7f.", "empty": b"", "garbage": b"\x00not a pickle",
             "truncated": pickle.dumps(cifar_batch(2, 10, 0, b"labels"))[:-100]}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataFormatError, match=name):
            read_cifar_batch(tmp_path / name)


def test_cifar_labels_out_of_range(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "c", "cifar10")
    batches["test_batch"][b"labels"][0] = 10
    dump(tmp_path / "c" / "test_batch", batches["test_batch"])
    with pytest.raises(DataFormatError, match="test_batch"):
        load_dataset("cifar10", tmp_path / "c")


# ----------------------------------------------------------------------------- loader


def test_make_loader_seeded_shuffling(digits: DataSplits) -> None:
    def order(loader: torch.utils.data.DataLoader) -> list[int]:
        return torch.cat([y for _, y in loader]).tolist()

    ds = torch.utils.data.TensorDataset(torch.arange(100).float().view(100, 1), torch.arange(100))
    a, b, c = (make_loader(ds, 32, shuffle=True, seed=s) for s in (7, 7, 8))
    epoch_a1, epoch_a2 = order(a), order(a)
    assert epoch_a1 == order(b) and epoch_a2 == order(b)  # same seed, same sequence of epochs
    assert epoch_a1 != epoch_a2 and epoch_a1 != order(c) and sorted(epoch_a1) == list(range(100))
    assert order(make_loader(ds, 32, shuffle=False)) == list(range(100))
    x, y = next(iter(make_loader(digits.train, 64, shuffle=True)))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,) and y.dtype == torch.int64
    assert [len(y) for _, y in make_loader(ds, 32, shuffle=False)] == [32, 32, 32, 4]
    empty = load_dataset("digits", val_fraction=0.0).val
    assert list(make_loader(empty, 8, shuffle=True)) == []
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            make_loader(ds, bad, shuffle=False)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the real thing, where installed


@pytest.mark.skipif(not Path(DEFAULT_ROOTS["fashion_mnist"]).is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist() -> None:
    s = load_dataset("fashion_mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert math.isclose(s.mean[0], 0.2860, abs_tol=2e-3) and math.isclose(s.std[0], 0.3530, abs_tol=2e-3)


# ----------------------------------------------------------------------------- labels of data files


def label_file(tmp_path: Path, y_train: np.ndarray, y_test: np.ndarray, y_val: np.ndarray | None = None,
               suffix: str = ".npz") -> Path:
    """A data file of 8-feature samples with the given labels."""
    arrays = {"x_train": np.zeros((len(y_train), 8), np.float32), "y_train": y_train,
              "x_test": np.zeros((len(y_test), 8), np.float32), "y_test": y_test}
    if y_val is not None:
        arrays |= {"x_val": np.zeros((len(y_val), 8), np.float32), "y_val": y_val}
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_one_huge_label_is_refused_before_any_model_is_built(tmp_path: Path, suffix: str) -> None:
    y = np.arange(100) % 10
    y[7] = 10**7  # the file: one label of 10**7 built an 850M-parameter model
    path = label_file(tmp_path, y, np.arange(20) % 10, suffix=suffix)
    with pytest.raises(DataFormatError) as e:
        load_dataset("file", path=path)
    msg = str(e.value)
    assert str(path) in msg and "10000000" in msg and "y_train" in msg and "\n" not in msg, msg
    # declaring the class count does not make such a label a class either
    with pytest.raises(DataFormatError, match=r"y_train holds label 10000000, but dataset.num_classes=10"):
        load_dataset("file", path=path, num_classes=10)


def test_more_classes_than_training_samples_is_refused(tmp_path: Path) -> None:
    path = label_file(tmp_path, np.array([0, 1, 2, 50]), np.array([0, 1]))
    with pytest.raises(DataFormatError, match=r"largest label in y_train is 50, which would make 51 classes for 4"):
        load_dataset("file", path=path)
    assert load_dataset("file", path=path, num_classes=51, val_fraction=0.0).num_classes == 51  # declared: taken


@pytest.mark.parametrize("split", ["test", "val"])
def test_a_label_never_seen_in_training_is_an_error_naming_split_and_label(tmp_path: Path, split: str) -> None:
    y_train, other = np.arange(60) % 10, np.array([0, 3, 12, 9])  # the issue: a silent 13-class model
    path = label_file(tmp_path, y_train, other if split == "test" else np.arange(10),
                      y_val=other if split == "val" else None)
    with pytest.raises(DataFormatError) as e:
        load_dataset("file", path=path)
    msg = str(e.value)
    assert f"y_{split} holds label 12" in msg and "0 .. 9" in msg and str(path) in msg, msg
    # with the class count declared, the split may hold a class the training split lacks
    assert load_dataset("file", path=path, num_classes=13).num_classes == 13
    with pytest.raises(DataFormatError, match=rf"y_{split} holds label 12, but dataset.num_classes=12"):
        load_dataset("file", path=path, num_classes=12)


def test_label_checks_reach_the_config_path_and_bound_num_classes(tmp_path: Path) -> None:
    from correctnet.data import MAX_CLASSES, dataset_from_config

    path = label_file(tmp_path, np.arange(60) % 10, np.array([0, 10]))
    with pytest.raises(DataFormatError, match="y_test holds label 10"):
        dataset_from_config({"name": "file", "path": str(path)}, seed=0)
    with pytest.raises(ConfigError, match=rf"dataset.num_classes={MAX_CLASSES + 1} is invalid"):
        dataset_from_config({"name": "file", "path": str(path), "num_classes": MAX_CLASSES + 1}, seed=0)
    big = label_file(tmp_path, np.array([0, 1, 2**63 + 5], dtype=np.uint64), np.array([0, 1], dtype=np.uint64))
    with pytest.raises(DataFormatError, match="y_train holds label"):
        load_dataset("file", path=big)
    ok = load_dataset("file", path=label_file(tmp_path, np.arange(60) % 10, np.arange(10)))
    assert ok.num_classes == 10
