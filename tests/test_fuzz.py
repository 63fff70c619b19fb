"""Fuzzing every file reader (checkpoints, resume snapshots, IDX and CIFAR-pickle datasets): random, truncated and
bit-flipped inputs either load or raise the project's own error; never another exception, a hang or a huge
allocation. Bounded: 150 derandomized examples per reader, a few seconds each (CI). A longer randomized session:
CORRECTNET_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import correctnet as cn
from correctnet.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from correctnet.data import read_cifar_batch, read_idx
from correctnet.errors import CorrectNetError, DataFormatError
from correctnet.resume import ResumeError, ResumeStore, load_state

EXAMPLES = int(os.environ.get("CORRECTNET_FUZZ_EXAMPLES", "0"))  # > 0: a longer, randomized local session
FUZZ = settings(max_examples=EXAMPLES or 150, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RAW = st.binary(max_size=2048)


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, bit flips, overwritten spans and appended junk of ``valid``."""
    n = len(valid)
    cut = st.integers(0, n - 1).map(lambda k: valid[:k])
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8).map(
        lambda fs: _flip(valid, fs))
    spans = st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0] + len(t[1]):])
    junk = st.binary(min_size=1, max_size=64).map(lambda b: valid + b)
    return st.one_of(cut, flips, spans, junk)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for i, bit in flips:
        b[i] ^= 1 << bit
    return bytes(b)


class Files:
    """Writes each example to one scratch file (hypothesis reuses the test's tmp_path across examples)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("fuzz"))


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    model = cn.analogize(cn.build_model("mlp", (1, 4, 4), 3, hidden=(8,)), cn.LogNormal(0.5))
    meta = {"model": {"name": "mlp", "input_shape": [1, 4, 4], "num_classes": 3, "kwargs": {"hidden": [8]}},
            "variation": {"name": "lognormal", "sigma": 0.5}}
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", model, meta)
    return path.read_bytes()


def _load_checkpoint_ok(path: Path) -> None:
    try:
        load_checkpoint(path)
    except CorrectNetError:  # CheckpointError, or ConfigError for settings it cannot honour
        pass


@FUZZ
@given(data=RAW)
def test_checkpoint_random_bytes(files, data):
    _load_checkpoint_ok(files.write("random.safetensors", data))


@FUZZ
@given(data=st.data())
def test_checkpoint_mutations(files, valid_checkpoint, data):
    _load_checkpoint_ok(files.write("mutated.safetensors", data.draw(mutations(valid_checkpoint))))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@FUZZ
@given(field=st.sampled_from(["model", "variation", "analog", "compensation", "model.name", "model.input_shape",
                              "model.num_classes", "model.kwargs", "variation.name", "variation.sigma"]),
       value=JSON)
def test_checkpoint_metadata_of_any_shape(files, valid_checkpoint, field, value):
    """Well-formed files whose JSON metadata holds arbitrary values where the model description goes."""
    path = files.write("meta.safetensors", valid_checkpoint)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["correctnet_meta"])
    head, _, leaf = field.partition(".")
    if leaf:
        if isinstance(meta[head], dict):
            meta[head][leaf] = value
    else:
        meta[head] = value
    text = json.dumps(meta)  # written that way: a valid format 2 digest, so the metadata itself is what is tested
    md = {"correctnet_format": "2", "correctnet_sha256": checkpoint_sha256(tensors, text), "correctnet_meta": text}
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    _load_checkpoint_ok(path)


# ----------------------------------------------------------------------------- resume snapshots

@pytest.fixture(scope="module")
def valid_snapshot(tmp_path_factory) -> bytes:
    store = ResumeStore(tmp_path_factory.mktemp("resume"))
    store.save("training", {"epoch": 1, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"loss": 0.5}],
                            "rng": torch.get_rng_state()[:64]})
    return store.path("training").read_bytes()


@FUZZ
@given(data=st.one_of(RAW, st.data()))
def test_resume_snapshot_random_and_mutated(files, valid_snapshot, data):
    raw = data if isinstance(data, bytes) else data.draw(mutations(valid_snapshot))
    try:
        load_state(files.write("training.pt", raw))
    except ResumeError:
        pass


# ----------------------------------------------------------------------------- IDX

def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


VALID_IDX = _idx(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))


def _read_idx_ok(path: Path) -> None:
    try:
        read_idx(path)
    except DataFormatError:
        pass


@FUZZ
@given(data=st.one_of(RAW, mutations(VALID_IDX), mutations(gzip.compress(VALID_IDX, mtime=0))))
def test_idx_random_truncated_and_flipped(files, data):
    _read_idx_ok(files.write("idx", data))


@FUZZ
@given(code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]), ndim=st.integers(0, 255),
       dims=st.one_of(st.lists(st.sampled_from([0, 1, 2, 3, 255, 2**16, 2**31, 2**32 - 1]), max_size=255),
                      st.integers(0, 255).map(lambda k: [1] * k)),  # many dimensions of size 1: a tiny array
       body=st.binary(max_size=64), gz=st.booleans())
def test_idx_headers_declaring_any_shape(files, code, ndim, dims, body, gz):
    """Huge or many dimensions must be refused from the header, without allocating what it declares."""
    raw = bytes([0, 0, code, ndim]) + struct.pack(f">{len(dims[:ndim])}I", *dims[:ndim]) + body
    _read_idx_ok(files.write("header", gzip.compress(raw, mtime=0) if gz else raw))


# ----------------------------------------------------------------------------- CIFAR pickles

def _cifar(protocol: int) -> bytes:
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [1, 2],
             b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251, b"filenames": [b"a.png", b"b.png"]}
    return pickle.dumps(batch, protocol=protocol)


def _read_cifar_ok(path: Path) -> None:
    try:
        read_cifar_batch(path)
    except DataFormatError:
        pass


@FUZZ
@given(data=st.one_of(RAW, mutations(_cifar(2)), mutations(_cifar(4)), mutations(_cifar(5))))
def test_cifar_random_truncated_and_flipped(files, data):
    _read_cifar_ok(files.write("data_batch", data))


@FUZZ
@given(value=JSON, key=st.sampled_from([b"data", b"labels", b"fine_labels", "labels", 3]))
def test_cifar_dict_of_any_values(files, value, key):
    """Valid pickles of dicts with arbitrary values where the images or labels go."""
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], key: value}
    _read_cifar_ok(files.write("any_batch", pickle.dumps(batch, protocol=2)))


def _piece(obj: object) -> bytes:
    """The opcodes that push ``obj`` (a protocol-2 pickle without its header and STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def test_deeply_nested_pickles_are_a_clear_error(files):
    """Nesting deeper than Python's recursion limit (labels, keys) is refused, not a RecursionError."""
    n = 50_000
    deep_list = b"]" * n + b"a" * (n - 1)  # EMPTY_LIST n times, APPEND n-1 times: [[[...]]]
    deep_tuple = b")" + b"\x85" * n  # EMPTY_TUPLE, TUPLE1 n times: ((((),),),)
    data = _piece(b"data") + _piece(np.zeros((1, 3072), np.uint8))
    for body in (data + _piece(b"labels") + deep_list, data + _piece(b"labels") + _piece([0]) + b"s" + deep_tuple
                 + _piece(1)):
        raw = b"\x80\x02}" + body + b"s."
        with pytest.raises(DataFormatError):
            read_cifar_batch(files.write("deep", raw))
