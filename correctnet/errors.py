"""Errors a user can cause. Each carries one readable message; the CLI prints it without a traceback."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable


class CorrectNetError(Exception):
    """Base class of every error caused by user input (config, data, files)."""


class ConfigError(CorrectNetError, ValueError):
    """A configuration value is invalid: the message names the key, the value and what is accepted."""


class DataNotFoundError(CorrectNetError, FileNotFoundError):
    """A dataset is missing: the message says where we looked and how to get it."""


class DataFormatError(CorrectNetError, ValueError):
    """A dataset file exists but is not in the expected format (truncated, wrong magic, wrong shape)."""


class CheckpointError(CorrectNetError):
    """A checkpoint cannot be written or read (exists, corrupt, unknown format, model not rebuildable)."""


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require(ok: bool, key: str, accepted: str, value: Any) -> None:
    """Raise ``ConfigError("<key> must be <accepted>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {accepted}, got {value!r}")


def run_command(action: Callable[[], Any]) -> int:
    """Run a command-line action; a user error becomes one ``correctnet: error:`` line and exit status 2."""
    try:
        action()
    except CorrectNetError as e:
        print(f"correctnet: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("correctnet: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
