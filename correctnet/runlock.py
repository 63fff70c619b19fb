"""A lock on a run directory: two runs in one directory at once would interleave their snapshots and results.

``<run dir>/.lock`` holds ``PID HOST``; it is created with ``O_CREAT | O_EXCL`` (atomic: one of two runs wins) and
removed when the run ends. A lock whose process is no longer running (the run was killed) is taken over.

The command line takes the lock when Hydra starts the run (:class:`LockCallback`), before Hydra writes the run's
``.hydra/`` records: a refused second run leaves the first's files untouched.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .errors import CorrectNetError

LOCK_NAME = ".lock"


class RunLockedError(CorrectNetError):
    """The run directory is in use by another live run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def holder(run_dir: str | os.PathLike) -> int | None:
    """The PID of the live process holding ``run_dir``'s lock, or None (no lock, or a stale one). A lock written
    on another host counts as live (its process cannot be checked from here)."""
    try:
        pid_text, _, host = (Path(run_dir) / LOCK_NAME).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if host != socket.gethostname() or _alive(pid) else None


_HELD: dict[Path, int] = {}  # lock path -> how many times this process acquired it


def acquire(run_dir: str | os.PathLike) -> None:
    """Lock ``run_dir`` for this process (re-entrant); :class:`RunLockedError` naming the holder's PID when another
    live run holds it. Creates the directory if needed."""
    path = Path(os.path.abspath(run_dir)) / LOCK_NAME
    if path in _HELD:
        _HELD[path] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                theirs = path.read_text()
            except FileNotFoundError:  # released meanwhile: try again
                continue
            pid = holder(path.parent)
            if pid is not None:
                raise RunLockedError(f"{path.parent} is in use by another run (PID {pid}, lock {path}): two runs in "
                                     f"one run directory would interleave; wait for it to finish or choose another "
                                     f"hydra.run.dir") from None
            # stale: move it aside atomically (only one taker succeeds), then create ours
            aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if aside.read_text() != theirs:  # another taker's fresh lock: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
            aside.unlink()
            print(f"correctnet: note: taking over the lock in {path.parent} of PID {theirs.split()[0] if theirs.split() else '?'}, "
                  f"which is no longer running", file=sys.stderr, flush=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        _HELD[path] = 1
        return
    pid = holder(path.parent)
    raise RunLockedError(f"{path.parent} is in use by another run (PID {pid}, lock {path})")


def release(run_dir: str | os.PathLike) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file."""
    path = Path(os.path.abspath(run_dir)) / LOCK_NAME
    if path not in _HELD:
        return
    _HELD[path] -= 1
    if _HELD[path] == 0:
        del _HELD[path]
        path.unlink(missing_ok=True)


def release_all() -> None:
    """Release every lock this process holds (its run ends: an exit that skipped the normal release)."""
    for path in list(_HELD):
        _HELD[path] = 1
        release(path.parent)


class LockCallback(Callback):
    """Hydra callback (``hydra.callbacks``): locks ``hydra.run.dir`` when a single run starts, releases it at its end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            acquire(str(OmegaConf.select(config, "hydra.run.dir")))
        except RunLockedError as e:  # Hydra turns a callback's exceptions into warnings: stop the command itself
            print(f"correctnet: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(str(OmegaConf.select(config, "hydra.run.dir")))
