"""Resume state: periodic, atomic snapshots of long stages, so an interrupted run continues where it stopped.

A :class:`ResumeStore` is a directory (``<run dir>/resume/`` for ``python -m correctnet.train``) holding one
file per stage, ``<stage>.pt``, plus ``config.json``, the configuration and versions that wrote it.
:func:`correctnet.training.train` saves after every epoch (and inside an epoch at most every
``interval_s`` seconds); :func:`correctnet.calibration.train_compensation` saves every ``interval_s``
seconds and when it ends. A snapshot holds everything the rest of the stage depends on (weights,
optimizer and schedule state, RNG states of torch, of the shuffle generator and of the analog layers'
noise generators, the history so far), so a resumed stage ends bit-identical to an uninterrupted one.

Files are written with :func:`correctnet.checkpoint.atomic_write` (temporary file, fsync, rename): a
kill at any moment leaves the previous snapshot intact. They are read with
``torch.load(weights_only=True)``, which never runs code from the file; any unreadable or foreign file
is one :class:`ResumeError`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write
from .errors import ConfigError, CorrectNetError

MODES = ("auto", "fresh", "require", "off")
FORMAT = 1
MAX_STATE_BYTES = 1 << 34  # 16 GiB: larger "state" files are refused before torch reads them


class ResumeError(CorrectNetError):
    """A resume snapshot cannot be read or does not belong to this run."""


@dataclass
class ResumeStore:
    """Snapshots of stages in ``directory``; ``interval_s``: minimum seconds between in-stage snapshots."""

    directory: Path
    interval_s: float = 60.0
    _last: dict[str, float] = field(default_factory=dict, repr=False)

    def path(self, stage: str) -> Path:
        return Path(self.directory) / f"{stage}.pt"

    def due(self, stage: str) -> bool:
        """True when ``interval_s`` seconds passed since ``stage`` was last saved or loaded (or first asked)."""
        return time.monotonic() - self._last.setdefault(stage, time.monotonic()) >= self.interval_s

    def save(self, stage: str, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``<directory>/<stage>.pt``."""
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "stage": stage, "state": state}, buf)
        atomic_write(self.path(stage), lambda tmp: Path(tmp).write_bytes(buf.getbuffer()), overwrite=True)
        self._last[stage] = time.monotonic()

    def load(self, stage: str) -> dict[str, Any] | None:
        """The state last saved for ``stage``, or None when there is none."""
        path = self.path(stage)
        if not path.is_file():
            return None
        state = load_state(path)
        if state["stage"] != stage:
            raise ResumeError(f"{path} holds the resume state of stage {state['stage']!r}, not {stage!r}")
        self._last[stage] = time.monotonic()
        return state["state"]

    def clear(self) -> None:
        """Remove the directory and every snapshot in it (the run finished)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a snapshot file written by :meth:`ResumeStore.save`; raises :class:`ResumeError` if it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise ResumeError(f"{path} is {size} bytes, more than a correctnet resume state can be")
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" on a foreign file: the error below says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ResumeError:
        raise
    except FileNotFoundError:
        raise ResumeError(f"no resume state at {path}") from None
    except Exception as e:  # anything a corrupt zip or pickle stream raises (weights_only: never runs code)
        raise ResumeError(f"{path} is not a readable correctnet resume state ({type(e).__name__}: "
                          f"{str(e)[:200]}); delete it or rerun with resume=fresh") from None
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("stage"), str)
            and isinstance(obj.get("state"), dict)):
        raise ResumeError(f"{path} is not a correctnet resume state (format {FORMAT}); delete it or rerun with "
                          f"resume=fresh")
    return obj


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty dicts stay values)."""
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def open_store(directory: str | os.PathLike, mode: str, record: dict[str, Any], *,
               interval_s: float = 60.0) -> ResumeStore | None:
    """The resume store of a run (None for ``mode="off"``), after checking it belongs to ``record``.

    ``record`` (JSON-serializable: the resolved config and versions) identifies the run. Modes:
    ``auto`` continues from saved state written by the same record and starts fresh when there is none;
    ``fresh`` discards any saved state; ``require`` fails unless saved state exists; ``off`` neither
    reads nor writes state. Saved state of another record is refused (``auto``, ``require``) with the
    differing keys named. Nothing is read or written beyond ``config.json`` here.
    """
    if mode not in MODES:
        raise ConfigError(f"resume must be one of {list(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    store = ResumeStore(Path(directory), interval_s)
    config = Path(directory) / "config.json"
    if mode == "fresh":
        store.clear()
    elif config.is_file():
        try:
            saved = json.loads(config.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ResumeError(f"{config} is unreadable ({e}); delete {directory} or rerun with resume=fresh") from None
        mine = json.loads(json.dumps(record))  # the same normalisation as the stored copy
        if saved != mine:
            a, b = _flatten(saved), _flatten(mine)
            diff = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
                    if a.get(k, "<unset>") != b.get(k, "<unset>")]
            raise ConfigError(f"resume=auto: {directory} holds the resume state of an interrupted run with another "
                              f"configuration ({'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); rerun the "
                              f"same command, use another hydra.run.dir, or pass resume=fresh to discard that state")
        return store
    if mode == "require":
        raise ConfigError(f"resume=require: there is no resume state in {directory} to continue from; "
                          f"accepted: resume=auto (continue when there is), fresh or off")
    atomic_write(config, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True)),
                 overwrite=True)
    return store


__all__ = ["MODES", "ResumeError", "ResumeStore", "load_state", "open_store"]
