"""Datasets as in-memory tensors: digits (bundled with scikit-learn), MNIST, Fashion-MNIST, CIFAR-10/100, and
the user's own arrays in one ``.npz`` or ``.pt`` file (``dataset=file dataset.path=data.npz``).

load_dataset returns a DataSplits of TensorDatasets: x float32 [N, C, H, W], scaled to [0, 1] and then
normalized per channel with the mean/std of the train split; y int64 [N] class indices.

A data file (:func:`load_file_dataset`) holds arrays ``x_train, y_train, x_test, y_test`` and optionally
``x_val, y_val`` (else val_fraction of the train split is split off, seeded). ``x``: images ``[N, C, H, W]``,
``[N, H, W]`` (one channel is added) or any ``[N, *features]`` (the model must accept that shape), of a
numeric dtype: uint8 is divided by 255, other dtypes are used as they are. ``y``: integer class indices
``[N]``, every split's within the training classes (0 .. the largest ``y_train`` label, or ``num_classes - 1``
when declared; at most MAX_CLASSES classes, and without num_classes no more than the training samples).
Normalization (``normalize``), with statistics of the train split: ``channel`` (default) per index of
dimension 1 (per channel for images, per feature for ``[N, F]``), ``global`` one mean/std, ``none``.
``.npz`` files are read with ``allow_pickle=False``, ``.pt`` files with ``torch.load(weights_only=True)``.
Files are parsed defensively: anything malformed raises DataFormatError naming the file; CIFAR pickles go
through a restricted unpickler that cannot run code; no header can make us allocate more than the file holds.
"""
from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from correctnet.errors import ConfigError, DataFormatError, DataNotFoundError

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100")
DEFAULT_ROOTS: dict[str, str] = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "data/mnist",
    "cifar10": "data/cifar-10-batches-py",
    "cifar100": "data/cifar-100-python",
}
NUM_CLASSES: dict[str, int] = {"digits": 10, "fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
_ALIASES = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = {
    "cifar10": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"),
    "cifar100": ("train", "test"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_HOW_TO_GET = {
    "fashion_mnist": "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian; files land in "
    "/usr/share/datasets/fashion-mnist), or download the four IDX files (.gz is fine) from "
    "https://github.com/zalandoresearch/fashion-mnist into a directory DIR and pass dataset.root=DIR.",
    "mnist": "Put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each with or without .gz) into a directory DIR and pass dataset.root=DIR.",
    "cifar10": f"Download the CIFAR-10 python version (cifar-10-python.tar.gz) from {_CIFAR_URL}, extract it "
    "(tar xzf cifar-10-python.tar.gz) and pass dataset.root=<path>/cifar-10-batches-py.",
    "cifar100": f"Download the CIFAR-100 python version (cifar-100-python.tar.gz) from {_CIFAR_URL}, extract it "
    "(tar xzf cifar-100-python.tar.gz) and pass dataset.root=<path>/cifar-100-python.",
}


@dataclass(frozen=True)
class DataSplits:
    """Train/val/test splits of one dataset: each a TensorDataset of (x float32 [N, C, H, W], y int64 [N]).

    (For a data file with other shapes, x is [N, *input_shape].)
    """

    name: str  # canonical dataset name, one of DATASETS
    train: TensorDataset
    val: TensorDataset  # may hold 0 samples (val_fraction=0)
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images
    mean: tuple[float, ...] = ()  # per channel (one value: global), in [0, 1] pixel units: x = (pixel - mean) / std
    std: tuple[float, ...] = ()
    scale: float = 1.0  # raw values were divided by this first (255 for uint8 pixels, 16 for digits)
    source: dict | None = None  # how to load it again: load_dataset(**source, seed=...) (file: an absolute path)

    def normalization(self) -> dict:
        """``{"mean", "std", "scale", "axis": 1}``: what :func:`normalize` needs to prepare raw inputs."""
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale, "axis": 1}


# ----------------------------------------------------------------------------- public API


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, val_fraction: float = 0.1, seed: int = 0,
    path: str | os.PathLike | None = None, normalize: str = "channel", num_classes: int | None = None,
) -> DataSplits:
    """Load a dataset fully into memory and split it; the same (name, val_fraction, seed) gives the same split.

    digits: scikit-learn's 1797 8x8 images (root is ignored), stratified 20% test, val_fraction of the rest.
    file: the arrays in ``path`` (see the module docstring; ``normalize`` and ``num_classes`` apply only here).
    Others: read from root (default DEFAULT_ROOTS[name]); val is a seeded random val_fraction of the official
    train split, test is the official test split.
    """
    if isinstance(name, str) and name.strip().lower() == "file":
        if path is None:
            raise ConfigError("dataset=file needs dataset.path=FILE (.npz or .pt)")
        return load_file_dataset(path, val_fraction=val_fraction, seed=seed, normalize=normalize,
                                 num_classes=num_classes)
    key = _canonical_name(name)
    _check_split_args(val_fraction, seed)
    if key == "digits":
        x, y, x_test, y_test = _load_digits(seed)
        train_idx, val_idx = _split_off(y, val_fraction, seed, stratify=True)
        scale = 16.0
    else:
        directory = Path(root if root is not None else DEFAULT_ROOTS[key])
        read = _load_idx_pair if key in ("mnist", "fashion_mnist") else _load_cifar_pair
        x, y, x_test, y_test = read(key, directory)
        train_idx, val_idx = _split_off(y, val_fraction, seed, stratify=False)
        scale = 255.0
    if len(train_idx) == 0:
        raise DataFormatError(f"Dataset {key!r}: the training split holds no images")
    x_train = torch.from_numpy(x[train_idx]).float().div_(scale)  # [N, C, H, W] in [0, 1]
    var, mean = torch.var_mean(x_train, dim=(0, 2, 3), correction=0)  # [C]
    std = var.sqrt().clamp_min(1e-8)

    def make(images: np.ndarray | torch.Tensor, labels: np.ndarray) -> TensorDataset:
        t = images if isinstance(images, torch.Tensor) else torch.from_numpy(images).float().div_(scale)
        t = t.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        return TensorDataset(t, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))

    return DataSplits(
        name=key,
        train=make(x_train, y[train_idx]),
        val=make(x[val_idx], y[val_idx]),
        test=make(x_test, y_test),
        num_classes=NUM_CLASSES[key],
        input_shape=tuple(int(d) for d in x.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        scale=scale,
        source={"name": key, "root": None if key == "digits" else os.path.abspath(directory),
                "val_fraction": val_fraction},
    )


FILE_KEYS = ("x_train", "y_train", "x_test", "y_test")
NORMALIZE = ("channel", "global", "none")
FILE_SUFFIXES = (".npz", ".pt", ".pth")
CONFIG_KEYS = ("name", "root", "path", "val_fraction", "normalize", "num_classes")
MAX_CLASSES = 100_000  # more is a label that is not a class index (one label 10**7 made an 850M-parameter model)


def dataset_from_config(params: dict, *, seed: int) -> DataSplits:
    """The dataset a ``dataset`` config section describes (``conf/dataset/*.yaml``: name, root or path,
    val_fraction, for files normalize and num_classes); errors name the config key."""
    params = dict(params)
    unknown = set(params) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown dataset keys {sorted(unknown)}; accepted: {', '.join(CONFIG_KEYS)}")
    name = params.get("name")
    is_file = isinstance(name, str) and name.strip().lower() == "file"
    if not is_file:
        for k in ("path", "normalize", "num_classes"):
            if params.get(k) is not None:
                raise ConfigError(f"dataset.{k} applies only to dataset=file (your own arrays), not to "
                                  f"dataset.name={name!r}")
        params = {k: v for k, v in params.items() if k in ("name", "root", "val_fraction")}
    elif params.get("root") is not None:
        raise ConfigError("dataset=file reads dataset.path, not dataset.root; pass dataset.path=FILE")
    try:
        return load_dataset(**{"val_fraction": 0.1, **params}, seed=seed)
    except DataNotFoundError as e:
        key = f"dataset.path={params.get('path')}" if is_file else f"dataset.root={params.get('root')}"
        raise e if str(e).startswith(key) else DataNotFoundError(f"{key}: {e}") from None


def normalize(x: torch.Tensor, meta_or_norm: dict) -> torch.Tensor:
    """Prepare raw inputs the way the training data was: ``(x / scale - mean) / std``, per channel (dim 1).

    ``meta_or_norm`` is checkpoint metadata (its ``normalization`` entry is used) or that entry itself
    (:meth:`DataSplits.normalization`). Integer tensors (raw pixels, e.g. uint8 0..255) are divided by
    ``scale`` first; float tensors are taken to be in the units the statistics are in already ([0, 1] pixel
    units for images; the file's own units for float arrays in a data file).
    """
    norm = meta_or_norm.get("normalization", meta_or_norm) if isinstance(meta_or_norm, dict) else None
    if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
        raise ConfigError("normalize needs checkpoint metadata with a 'normalization' entry {mean, std, scale} "
                          "(checkpoints written by python -m correctnet.train have it)")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float() / float(norm.get("scale") or 1.0)
    mean, std = torch.tensor(norm["mean"], dtype=x.dtype), torch.tensor(norm["std"], dtype=x.dtype)
    if mean.numel() == 0:
        return x
    shape = [1, -1] + [1] * (x.dim() - 2)
    if x.dim() < 2 or (mean.numel() > 1 and x.shape[1] != mean.numel()):
        raise ConfigError(f"normalize: inputs of shape {list(x.shape)} do not have {mean.numel()} channels in "
                          f"dimension 1 (a batch [N, C, ...] is expected)")
    return (x - mean.view(shape)) / std.view(shape)


def load_file_dataset(path: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                      normalize: str = "channel", num_classes: int | None = None) -> DataSplits:
    """The user's arrays in ``path`` (.npz or .pt) as DataSplits named ``"file"`` (format: module docstring).

    ``num_classes`` defaults to the largest training label + 1 (set it when some classes are absent from the
    file). Labels outside [0, num_classes) in any split are refused, naming the split and the label.
    """
    _check_split_args(val_fraction, seed)
    if normalize not in NORMALIZE:
        raise ConfigError(f"dataset.normalize={normalize!r} is invalid: expected one of {', '.join(NORMALIZE)}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise ConfigError(f"dataset.num_classes={num_classes!r} is invalid: expected an integer in "
                          f"[1, {MAX_CLASSES}] or null")
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    arrays = _read_data_file(path)
    missing = [k for k in FILE_KEYS if k not in arrays]
    if ("x_val" in arrays) != ("y_val" in arrays):
        missing.append("y_val" if "x_val" in arrays else "x_val")
    if missing:
        raise DataFormatError(f"{path}: missing array(s) {', '.join(missing)}; a data file holds x_train, y_train, "
                              f"x_test, y_test (optionally x_val, y_val); found: {', '.join(sorted(arrays)) or 'none'}")
    splits = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    xs = {s: _check_x(arrays[f"x_{s}"], f"x_{s}", path) for s in splits}
    ys = {s: _check_y(arrays[f"y_{s}"], f"y_{s}", len(xs[s]), path) for s in splits}
    shapes = {s: tuple(x.shape[1:]) for s, x in xs.items()}
    if len(set(shapes.values())) > 1:
        raise DataFormatError(f"{path}: the splits' samples have different shapes: "
                              + ", ".join(f"x_{s} {list(v)}" for s, v in shapes.items()))
    if len(xs["train"]) == 0 or len(xs["test"]) == 0:
        raise DataFormatError(f"{path}: x_train and x_test must hold at least one sample each")
    n_classes = _class_count(ys, num_classes, path)
    dtypes = {str(x.dtype) for x in xs.values()}
    if len(dtypes) > 1:
        raise DataFormatError(f"{path}: the splits have different dtypes {sorted(dtypes)}; use one for all")
    scale = 255.0 if xs["train"].dtype == np.uint8 else 1.0
    x, y = xs["train"], ys["train"]
    if "val" in xs:
        x_val, y_val = xs["val"], ys["val"]
        train_idx = np.arange(len(x))
    else:
        train_idx, val_idx = _split_off(y, val_fraction, seed, stratify=False)
        x_val, y_val = x[val_idx], y[val_idx]
    if len(train_idx) == 0:
        raise DataFormatError(f"{path}: the training split holds no samples after splitting off val_fraction")
    x_train = torch.from_numpy(np.ascontiguousarray(x[train_idx])).float().div_(scale)
    if normalize == "none":
        mean, std = torch.zeros(0), torch.ones(0)
    else:
        dims = tuple(d for d in range(x_train.dim()) if d != 1) if normalize == "channel" else None
        var, mean = torch.var_mean(x_train.double(), dim=dims, correction=0)  # float64: big files, exact enough
        mean, std = mean.float().reshape(-1), var.sqrt().float().clamp_min(1e-8).reshape(-1)
    view = [1, -1] + [1] * (x_train.dim() - 2)

    def make(t: torch.Tensor, labels: np.ndarray) -> TensorDataset:
        if mean.numel():
            t = t.sub_(mean.view(view)).div_(std.view(view))
        return TensorDataset(t, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float().div_(scale)

    return DataSplits(
        name="file", train=make(x_train, y[train_idx]), val=make(tensor(x_val), y_val),
        test=make(tensor(xs["test"]), ys["test"]), num_classes=n_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]), mean=tuple(mean.tolist()), std=tuple(std.tolist()),
        scale=scale, source={"name": "file", "path": str(path), "val_fraction": val_fraction, "normalize": normalize,
                             "num_classes": num_classes})


def make_loader(ds: TensorDataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches (x [B, ...], y [B]) of a TensorDataset, the last one possibly smaller; num_workers=0.

    With shuffle=True the order comes from a torch.Generator seeded with seed: two loaders built with the
    same seed give the same batches, epoch after epoch (each epoch is a new permutation).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    shuffle = shuffle and len(ds) > 0  # RandomSampler refuses empty datasets (e.g. val with val_fraction=0)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_IDX_BYTES = 1 << 30  # 1 GiB; MNIST's train images are 47 MB
_MAX_IDX_DIMS = 32  # numpy < 2 supports 32 dimensions, numpy 2 64


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, plain or gzipped: magic 00 00 <type> <ndim>, ndim big-endian uint32 dims, then the data.

    Returns the array in native byte order, e.g. uint8 [N, 28, 28] (images) or uint8 [N] (labels).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            head = _read_at_most(f, 4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or head[3] == 0:
                magic = head.hex(" ") or "(none)"
                raise DataFormatError(f"{path}: not an IDX file: magic bytes {magic}, expected 00 00 <type> <ndim>")
            dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
            if ndim > _MAX_IDX_DIMS:
                raise DataFormatError(f"{path}: IDX header announces {ndim} dimensions; at most {_MAX_IDX_DIMS} "
                                      f"are supported (numpy's limit; datasets use 1 to 4)")
            raw_dims = _read_at_most(f, 4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataFormatError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > _MAX_IDX_BYTES:
                raise DataFormatError(f"{path}: IDX header announces shape {dims} ({nbytes} bytes), implausibly large")
            data = _read_at_most(f, nbytes + 1)  # one extra byte detects trailing garbage
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{path}: no such file") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(data) != nbytes:
        what = "is truncated" if len(data) < nbytes else "has trailing bytes"
        raise DataFormatError(f"{path}: {what}: header says shape {dims} of {dtype.name} = {nbytes} data bytes")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def read_cifar_batch(path: str | os.PathLike, label_key: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR "python version" batch with a restricted unpickler (no code execution).

    Returns (images uint8 [N, 3, 32, 32], labels int64 [N]); labels come from label_key, by default b"fine_labels"
    (CIFAR-100) if present, else b"labels" (CIFAR-10).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{path}: no such file") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataFormatError as e:
        raise DataFormatError(f"{path}: {e}") from None
    except Exception as e:  # anything a malformed pickle can raise: UnpicklingError, EOFError, ValueError, ...
        raise DataFormatError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: not a CIFAR python batch (a pickled {type(obj).__name__}, expected a dict)")
    obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    keys = [label_key] if label_key is not None else [b"fine_labels", b"labels"]
    key = next((k for k in keys if k in obj), None)
    if b"data" not in obj or key is None:
        found = ", ".join(sorted(map(repr, obj)))
        raise DataFormatError(f"{path}: CIFAR batch needs keys b'data' and one of {keys}; found {found}")
    data = obj[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: b'data' must be a uint8 array [N, 3072], got {got}")
    try:
        labels = np.asarray(obj[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataFormatError(f"{path}: labels {key!r} are not integers ({e})") from e
    if labels.shape != (len(data),):
        raise DataFormatError(f"{path}: {len(data)} images but labels {key!r} have shape {labels.shape}")
    return np.array(data, dtype=np.uint8).reshape(-1, 3, 32, 32), labels  # a writable plain-ndarray copy


# ----------------------------------------------------------------------------- internals


def _check_split_args(val_fraction: float, seed: int) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction <= 0.5:
        raise ConfigError(f"dataset.val_fraction={val_fraction!r} is invalid: expected a number in [0, 0.5]")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} is invalid: expected an integer in [0, 2**32)")


def _read_data_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays in a .npz (allow_pickle=False) or .pt (torch.load weights_only=True) file, as numpy arrays."""
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"dataset.path={path}: unsupported file type {path.suffix or '(none)'!r}; accepted: "
                          f"{', '.join(FILE_SUFFIXES)} (numpy.savez / torch.save of a dict of arrays)")
    if not path.is_file():
        raise DataNotFoundError(f"dataset.path={path}: no such file" + ("" if path.parent.is_dir() else
                                                                      f" (directory {path.parent} does not exist)"))
    if path.suffix.lower() == ".npz":
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would treat anything else as a pickle
            raise DataFormatError(f"{path}: not a readable .npz file (not a zip archive: it starts with "
                                  f"{magic.hex(' ') or 'nothing'}); write it with numpy.savez")
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except ValueError as e:  # object arrays need pickles: refused
            raise DataFormatError(f"{path}: cannot read this .npz without unpickling ({e}); save plain numeric "
                                  f"arrays") from None
        except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, OSError, EOFError, ...
            raise DataFormatError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (refused global), RuntimeError, EOFError, ...
        raise DataFormatError(f"{path}: not a readable torch.save file of tensors, loaded with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: holds a {type(obj).__name__}; expected a dict of tensors "
                              f"{{'x_train': ..., 'y_train': ..., 'x_test': ..., 'y_test': ...}}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v.detach().cpu().numpy() if v.dtype != torch.bfloat16 else v.float().numpy()
        elif str(k) in FILE_KEYS + ("x_val", "y_val"):
            raise DataFormatError(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
    return out


def _check_x(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.dtype.kind not in "uif":
        raise DataFormatError(f"{path}: {key} has dtype {x.dtype}; expected a numeric (uint8, int or float) array")
    if x.ndim < 2:
        raise DataFormatError(f"{path}: {key} has shape {list(x.shape)}; expected [N, C, H, W], [N, H, W] or "
                              f"[N, *features]")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataFormatError(f"{path}: {key} contains NaN or infinite values")
    return x[:, None] if x.ndim == 3 else x


def _check_y(y: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if y.dtype.kind not in "ui":
        raise DataFormatError(f"{path}: {key} has dtype {y.dtype}; labels must be integer class indices "
                              f"(0 .. num_classes-1), e.g. y.astype(np.int64)")
    if y.shape != (n,):
        raise DataFormatError(f"{path}: {key} has shape {list(y.shape)}; expected [{n}] (one label per sample "
                              f"of x_{key[2:]})")
    if y.size and y.min() < 0:
        raise DataFormatError(f"{path}: {key} has negative labels ({int(y.min())}); expected 0 .. num_classes-1")
    if y.size and int(y.max()) > np.iinfo(np.int64).max:  # uint64: the int64 cast below would wrap it negative
        raise DataFormatError(f"{path}: {key} holds label {int(y.max())}; expected 0 .. num_classes-1")
    return y.astype(np.int64)


def _class_count(ys: dict[str, np.ndarray], num_classes: int | None, path: Path) -> int:
    """The number of classes C: ``num_classes`` when declared, else the largest training label + 1. Every label
    must lie in [0, C): a test or validation label the training labels never reach is an error, not a bigger
    model; so is a C larger than the training samples (inferred) or than MAX_CLASSES."""
    train = ys["train"]
    top = int(train.max())
    if num_classes is not None:  # in [1, MAX_CLASSES], checked by the caller
        n_classes = num_classes
    elif top + 1 > min(len(train), MAX_CLASSES):
        raise DataFormatError(f"{path}: the largest label in y_train is {top}, which would make {top + 1:,} classes "
                              f"for {len(train):,} training samples; labels must be class indices 0 .. C-1 "
                              f"(remap them, e.g. np.unique(y, return_inverse=True)) or set dataset.num_classes")
    else:
        n_classes = top + 1
    for split, y in ys.items():
        if y.size and int(y.max()) >= n_classes:
            bad = int(y.max())
            if num_classes is not None:
                raise DataFormatError(f"{path}: y_{split} holds label {bad}, but dataset.num_classes={num_classes} "
                                      f"(labels 0 .. {num_classes - 1})")
            raise DataFormatError(f"{path}: y_{split} holds label {bad}, which no training label reaches (y_train: "
                                  f"0 .. {top}); every {split} label must be a training class: fix the labels, or "
                                  f"set dataset.num_classes if the training split lacks that class")
    if n_classes < 2:
        raise DataFormatError(f"{path}: the labels hold a single class ({top}); classification needs >= 2")
    return n_classes


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError(f"dataset.name={name!r} is unknown: expected one of {', '.join(DATASETS)}, or file "
                          f"(dataset=file dataset.path=FILE.npz|.pt)")
    return key


def _split_off(y: np.ndarray, fraction: float, seed: int, *, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..len(y)-1 into (keep, out) with round(fraction * len(y)) seeded-random ones in out; sorted."""
    n_out = int(round(fraction * len(y)))
    if n_out == 0:
        return np.arange(len(y)), np.arange(0)
    if stratify and n_out >= len(np.unique(y)):
        from sklearn.model_selection import train_test_split

        keep, out = train_test_split(np.arange(len(y)), test_size=n_out, random_state=seed, stratify=y)
    else:
        perm = np.random.default_rng(seed).permutation(len(y))
        keep, out = perm[n_out:], perm[:n_out]
    return np.sort(keep), np.sort(out)


def _load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as (x uint8 [N, 1, 8, 8] in 0..16, y, x_test, y_test), stratified 20% test by seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.uint8)[:, None], d.target.astype(np.int64)
    rest, test = _split_off(y, 0.2, seed, stratify=True)
    return x[rest], y[rest], x[test], y[test]


def _find_files(key: str, directory: Path, names: tuple[str, ...], gz: bool) -> list[Path]:
    """Paths of the dataset's files (name or name.gz); one DataNotFoundError listing everything missing."""
    directory = Path(os.path.abspath(directory))
    if not directory.is_dir():
        raise DataNotFoundError(f"Dataset {key!r} not found: directory {directory} does not exist. {_HOW_TO_GET[key]}")
    found, missing = [], []
    for name in names:
        candidates = [directory / name] + ([directory / f"{name}.gz"] if gz else [])
        hit = next((p for p in candidates if p.is_file()), None)
        missing += candidates if hit is None else []
        found.append(hit)
    if missing:
        raise DataNotFoundError(
            f"Dataset {key!r} not found: missing in {directory}: {', '.join(map(str, missing))}. {_HOW_TO_GET[key]}"
        )
    return found  # type: ignore[return-value]


def _check_labels(labels: np.ndarray, key: str, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES[key]):
        raise DataFormatError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES[key] - 1}")
    return labels.astype(np.int64)


def _load_idx_pair(key: str, directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-layout IDX files as (x_train uint8 [N, 1, H, W], y_train int64 [N], x_test, y_test)."""
    paths = _find_files(key, directory, _IDX_FILES, gz=True)
    out = []
    for img_path, lbl_path in (paths[0:2], paths[2:4]):
        x, y = read_idx(img_path), read_idx(lbl_path)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataFormatError(f"{img_path}: expected uint8 images [N, H, W], got {x.dtype} {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DataFormatError(f"{lbl_path}: expected uint8 labels [N], got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DataFormatError(f"{img_path} has {len(x)} images but {lbl_path} has {len(y)} labels")
        out += [x[:, None], _check_labels(y, key, lbl_path)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataFormatError(f"{paths[0]} {out[0].shape[2:]} and {paths[2]} {out[2].shape[2:]}: image sizes differ")
    return out[0], out[1], out[2], out[3]


def _load_cifar_pair(key: str, directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR python batches as (x_train uint8 [N, 3, 32, 32], y_train int64 [N], x_test, y_test)."""
    paths = _find_files(key, directory, _CIFAR_FILES[key], gz=False)
    batches = [read_cifar_batch(p) for p in paths]
    for (_, y), p in zip(batches, paths):
        _check_labels(y, key, p)
    x_train = np.concatenate([x for x, _ in batches[:-1]])
    y_train = np.concatenate([y for _, y in batches[:-1]])
    return x_train, y_train, batches[-1][0], batches[-1][1]


def _read_at_most(f: io.BufferedIOBase, n: int) -> bytes:
    """Read up to n bytes in 1 MiB chunks, so a lying header cannot make us allocate more than the file holds."""
    chunks = []
    while n > 0 and (chunk := f.read(min(n, 1 << 20))):
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class _NdarrayToken:
    """Stands in for numpy.ndarray in a pickle: only _reconstruct accepts it, so ndarray(huge_shape) cannot run."""

    __slots__ = ()


class _SafeArray(np.ndarray):
    """What _reconstruct builds. __setstate__ takes only plain numeric dtypes and raw bytes that match the
    shape exactly, so a pickle can neither smuggle object pointers nor make numpy allocate beyond the file."""

    def __setstate__(self, state: tuple) -> None:
        *_, shape, dtype, fortran, raw = state  # (version, shape, dtype, is_fortran, rawdata), version optional
        dtype = _plain_dtype(dtype)
        ok_shape = isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
        if not (ok_shape and isinstance(raw, (bytes, bytearray)) and len(raw) == math.prod(shape) * dtype.itemsize):
            raise DataFormatError("pickled array state does not match its shape and dtype")
        # numpy's stubs ask for np.bool_ and bytes | list; the runtime takes a Python bool and any bytes-like
        super().__setstate__((1, shape, dtype, bool(fortran), raw))  # type: ignore[arg-type]


def _plain_dtype(dt: object) -> np.dtype:
    """A fresh copy of a plain bool/int/uint/float dtype (pickles may have edited the flags of the one they built)."""
    if not (isinstance(dt, np.dtype) and dt.kind in "biuf" and dt.fields is None and dt.subdtype is None):
        raise DataFormatError(f"pickled array has dtype {dt!r}; only plain numeric dtypes are accepted")
    return np.dtype(dt.str)


# The globals numpy pickles of CIFAR batches refer to, each wrapped. They take *args only: a pickle can set
# attributes on the functions it gets (e.g. __defaults__), so none relies on defaults or mutable state.
def _pickled_dtype(*args: object) -> np.dtype:  # numpy.dtype(spec, align, copy)
    spec = args[0].decode("latin1") if isinstance(args[0], bytes) else args[0]
    if not isinstance(spec, str):
        raise DataFormatError(f"pickle builds a dtype from {type(spec).__name__}")
    _plain_dtype(np.dtype(spec))
    return np.dtype(spec, False, True)  # copy=True: its __setstate__ must never edit numpy's shared dtype


def _pickled_reconstruct(*args: object) -> np.ndarray:  # numpy pickles: _reconstruct(ndarray, (0,), b"b")
    if len(args) != 3 or not isinstance(args[0], _NdarrayToken) or args[1] != (0,) or args[2] != b"b":
        raise DataFormatError("pickle calls numpy's _reconstruct with arguments numpy never writes")
    return _SafeArray((0,), dtype=np.uint8)


def _pickled_frombuffer(*args: object) -> np.ndarray:  # protocol 5: _frombuffer(buf, dtype, shape, order)
    buf, dtype, shape, order = args[:4]
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise DataFormatError("pickle calls numpy's _frombuffer with arguments numpy never writes")
    # the pickle's shape, unchecked here: reshape raises (the caller reports it) on anything not a shape of buf
    return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(cast("tuple[int, ...]", shape), order=order)


def _pickled_encode(*args: object) -> bytes:  # Python 3 protocol <= 2 writes bytes as _codecs.encode(str, "latin1")
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise DataFormatError("pickle calls _codecs.encode with arguments a bytes object never needs")
    return codecs.encode(args[0], "latin1")


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only what a pickled dict of numpy arrays, bytes, strings and int lists needs.

    Built on the pure-Python unpickler, whose memo is a dict: the C one allocates a table as large as the
    largest memo index in the file, so a 10-byte pickle could ask for gigabytes.
    """

    def find_class(self, module: str, name: str) -> object:
        core = module.replace("numpy._core", "numpy.core")
        if (core, name) == ("numpy", "ndarray"):
            return _NdarrayToken()
        table = {
            ("numpy", "dtype"): _pickled_dtype,
            ("numpy.core.multiarray", "_reconstruct"): _pickled_reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _pickled_frombuffer,
            ("_codecs", "encode"): _pickled_encode,
        }
        if (core, name) not in table:
            raise DataFormatError(f"pickle refers to {module}.{name}, which a CIFAR batch never needs; refusing it")
        return table[(core, name)]
