"""Checkpoints: nominal weights in safetensors, everything needed to rebuild the model as JSON metadata.

Format 1 is one ``.safetensors`` file. Its tensors are the model's ``state_dict()``; its string metadata
holds ``correctnet_format`` (``"1"``), ``correctnet_sha256`` (digest of the tensors, catches bit rot)
and ``correctnet_meta``, a JSON object with

* ``model``: ``{"name", "input_shape", "num_classes", "kwargs"}`` for :func:`correctnet.build_model`;
* ``variation``: ``VariationModel.to_dict()``; ``analog``: ``{"include", "exclude", "layers"}``
  (``layers``, the analog layer names, is filled in at save);
* ``versions``: ``{"correctnet", "torch", "safetensors", "format", ...}``, filled in at save;
* written by ``python -m correctnet.train``: ``dataset``, ``stage``, ``config`` (the resolved Hydra
  config) and ``metrics`` (``metrics.json``, per-chip accuracies and chip seeds included);
* ``compensation``: ``{layer: {"kind", "rank", "affine"}}`` of the attached compensation modules (null
  when none), filled in at save; loading re-attaches them before the weights are loaded;
* reserved: ``placement`` (the placement search's record).

Safety: loading never unpickles. The header is checked before safetensors sees the file (pickles and
zip archives from ``torch.save`` are named and refused, the header size is bounded by the file size),
the model is built on the meta device and compared with the file before any weight is allocated, and
every failure is one :class:`CheckpointError`. Files are written atomically (temporary file, fsync,
rename) and an existing file is only replaced when ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .analog import analog_layers, analogize
from .compensation import attach_from_spec, compensation_spec
from .errors import ConfigError, CorrectNetError
from .models import build_model
from .variation import make_variation

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger length field is not a safetensors file


class CheckpointError(CorrectNetError):
    """A checkpoint cannot be written or read (exists, corrupt, unknown format, model not rebuildable)."""


# ----------------------------------------------------------------------------- writing

def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename the temporary file to ``path`` (same directory).

    A failure or interruption at any point leaves ``path`` as it was: absent, or the previous file.
    Without ``overwrite`` an existing ``path`` is never replaced, even if it appears while writing.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)  # data on disk before the rename makes it visible
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _create_temp(path: Path) -> Path:
    # not tempfile.mkstemp: its 0600 mode would survive the rename; O_CREAT with 0666 honours the umask
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _rename_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it") from None
    except OSError:  # file system without hard links
        if path.exists():
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform; the rename itself is done
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and raw bytes of ``tensors`` (CPU, contiguous)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.detach().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint (the format is :data:`FORMAT_VERSION`)."""
    return {"correctnet": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "format": FORMAT_VERSION}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``model.state_dict()`` and ``meta`` (JSON-serializable) to ``path`` atomically; returns ``path``.

    ``meta`` needs ``model`` and ``variation`` (see the module docstring); ``versions`` and
    ``analog.layers`` are added to the stored copy, ``meta`` itself is not modified.
    """
    for key in ("model", "variation"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata needs a {key!r} entry")
    layers = list(analog_layers(model))
    if not layers:
        raise CheckpointError(f"{type(model).__name__} has no analog layers; analogize it before saving")
    meta = {**meta, "versions": {**(meta.get("versions") or {}), **versions()},
            "analog": {"include": None, "exclude": [], **(meta.get("analog") or {}), "layers": layers},
            "compensation": compensation_spec(model)}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable: {e}") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"correctnet_format": FORMAT_VERSION, "correctnet_sha256": tensor_digest(tensors),
                "correctnet_meta": meta_json}
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from None


# ----------------------------------------------------------------------------- reading

def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, after checks that need no large allocation."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")  # bounded before anything more is read or allocated
        if len(head) < 9 or head[8:] != b"{" or not 2 <= n <= MAX_HEADER_BYTES:
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                kind = "a zip archive (torch.save)" if head[:1] == b"P" else "a Python pickle (torch.save)"
                raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint: it is {kind}. correctnet "
                                      f"never unpickles files (unpickling can run arbitrary code); export models "
                                      f"with correctnet.save_checkpoint")
            if len(head) < 9:
                raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint: only {size} bytes long")
            raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint (it does not start with "
                                  f"a safetensors header)")
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = b"{" + f.read(n - 1)
    try:
        header = json.loads(raw)
        end = max([8 + n] + [8 + n + int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint (its header is not a valid "
                              f"safetensors JSON header; corrupt file?)") from None
    if end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {end} bytes, the file has {size} "
                              f"(interrupted copy or download?)")
    if end < size:
        raise CheckpointError(f"{path} is corrupt: {size - end} unexpected bytes after the tensors")
    return header


def _check_state(path: Path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {list(tensors[k].shape)} (model: {list(v.shape)})" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the model described in its metadata; "
                              + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the analog model saved at ``path``; returns ``(model in eval mode on device, metadata)``.

    Needs neither Hydra nor training code. The model computes nominally (analog mode off) until a chip
    is programmed (:func:`correctnet.chip`); its layers use the variation model stored in the metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    header = _read_header(path)
    stored = header.get("__metadata__")
    stored = stored if isinstance(stored, dict) else {}
    fmt = stored.get("correctnet_format")
    if fmt is None:
        raise CheckpointError(f"{path} is a safetensors file but not a correctnet checkpoint (no correctnet_format "
                              f"in its metadata)")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not supported; correctnet {__version__} reads "
                              f"format {FORMAT_VERSION!r} (a newer correctnet may read it)")
    try:
        meta = json.loads(stored["correctnet_meta"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: the correctnet metadata is missing or corrupt ({e})") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    digest = stored.get("correctnet_sha256")
    if digest is not None and digest != tensor_digest(tensors):
        raise CheckpointError(f"{path} is corrupt: its weights do not match the digest recorded at export")

    try:
        spec, var, analog = meta["model"], meta["variation"], meta.get("analog") or {}
        variation = make_variation(**var)

        layers = analog.get("layers")
        if layers is not None:  # exact names recorded at save (glob.escape: names are not patterns)
            include, exclude = [glob.escape(n) for n in layers], []
        else:
            include, exclude = analog.get("include"), analog.get("exclude") or []
        comp = meta.get("compensation")

        def build() -> nn.Module:
            m = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **(spec.get("kwargs") or {}))
            analogize(m, variation, include=include, exclude=exclude, inplace=True)
            if comp:
                attach_from_spec(m, comp)
            return m

        with torch.device("meta"):  # shapes only: nothing allocated before the file is known to fit
            _check_state(path, build().state_dict(), tensors)
        with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the caller's RNG
            model = build()
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())  # a float64 export stays float64: outputs must be bit-identical
        model.load_state_dict(tensors, strict=True)
    except CheckpointError:
        raise
    except (CorrectNetError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from this checkpoint "
                              f"({type(e).__name__}: {e})") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, TypeError) as e:  # AssertionError: torch built without CUDA
        raise ConfigError(f"cannot use device {device!r} here ({e}); use device=cpu") from None
    return model.eval(), meta
