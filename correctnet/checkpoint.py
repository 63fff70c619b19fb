"""Checkpoints: nominal weights in safetensors, everything needed to rebuild the model as JSON metadata.

Format 1: a single ``.safetensors`` file whose tensors are the model's ``state_dict()`` and whose
metadata has ``"correctnet_format": "1"`` and ``"correctnet_meta"``: a JSON object with at least
``model`` (``{"name", "input_shape", "num_classes", "kwargs"}``), ``variation`` and ``analog``
(``{"include", "exclude"}``). Nothing is unpickled on load. Files are written atomically and an
existing file is only replaced when ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .analog import analogize
from .errors import CorrectNetError
from .models import build_model
from .variation import make_variation

FORMAT_VERSION = "1"


class CheckpointError(CorrectNetError):
    """A checkpoint cannot be written or read (exists, corrupt, unknown format, model not rebuildable)."""


def atomic_write(path: str | os.PathLike, write: Any, *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (same directory, atomic)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``model.state_dict()`` and ``meta`` (JSON-serializable) to ``path`` atomically."""
    for key in ("model", "variation"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata needs a {key!r} entry")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"correctnet_format": FORMAT_VERSION, "correctnet_meta": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the analog model saved at ``path``; returns ``(model in eval mode, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if header.get("correctnet_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('correctnet_format')!r}; "
                              f"this correctnet reads format {FORMAT_VERSION!r}")
    try:
        meta = json.loads(header["correctnet_meta"])
        spec = meta["model"]
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec.get("kwargs", {}))
        var = meta["variation"]
        variation = make_variation(var["name"], **{k: v for k, v in var.items() if k != "name"})
        analog = meta.get("analog", {})
        model = analogize(model, variation, include=analog.get("include"), exclude=analog.get("exclude", ()), inplace=True)
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from this checkpoint ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), meta
