"""Files written atomically: a temporary file in the same directory, fsynced, then renamed.

Every file correctnet writes (checkpoints, metrics, plots, tables, resume snapshots) goes through
:func:`atomic_write`, so an interruption never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

__all__ = ["atomic_write"]


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
