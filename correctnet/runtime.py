"""Process settings of the command lines: torch CPU threads and whether progress bars are drawn.

``threads``: ``auto`` or an integer >= 1, applied with :func:`torch.set_num_threads` before any work. ``auto`` is
1 thread (or ``$OMP_NUM_THREADS`` when that is set): on a machine that is busy with anything else (a sweep,
another job, the tests) torch's default of one thread per core makes the small default jobs several times slower
(threads spin-wait for each other), while one thread costs them little on an idle machine; measured numbers are
in the README. Large models on an idle machine gain from ``threads=N`` (N <= the cores). The thread count is
recorded (``metrics.json: environment.torch_threads``) because CPU results can differ in the last bit between
thread counts; ``correctnet evaluate`` uses the recorded count by default so that it reproduces a run exactly.

``workers`` (``evaluation.workers``): processes the Monte-Carlo chips are spread over (CPU; each with ``threads``
threads). ``auto`` is the usable cores divided by ``threads``. Independent processes do not spin-wait for each other
the way intra-op threads do, so this stays right on a busy machine: the scheduler shares the cores between all
processes, and more of them keep this job's share. Measured on the 2-core machine, digits default job with both
cores kept busy by other processes: 95.6 s with 2 workers, 143.9 s with 1 (docs/speed.md). Per-chip results do
not depend on it.

``progress``: ``auto`` (bars only when stderr is a terminal: a redirected log is not flooded), ``true`` or ``false``.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .errors import ConfigError, is_int

THREADS_ACCEPTED = "auto or an integer >= 1"
PROGRESS_ACCEPTED = "auto, true or false"


def auto_threads() -> int:
    """What ``threads=auto`` means: ``$OMP_NUM_THREADS`` when it is a positive integer, else 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) >= 1 else 1


def resolve_threads(value: Any, key: str = "threads") -> int:
    """The thread count ``value`` (``auto``, an int, or its string from a command line) stands for."""
    if value is None or value == "auto":
        return auto_threads()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not is_int(value) or value < 1:
        raise ConfigError(f"{key} must be {THREADS_ACCEPTED}, got {value!r}")
    return value


def set_threads(value: Any, key: str = "threads") -> int:
    """Resolve ``value`` and apply it with :func:`torch.set_num_threads`; returns the count."""
    n = resolve_threads(value, key)
    torch.set_num_threads(n)
    return n


def auto_workers(threads: int = 1) -> int:
    """What ``workers=auto`` means: usable cores // ``threads``, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(threads, 1))


def resolve_workers(value: Any, threads: int = 1, key: str = "evaluation.workers") -> int:
    """The worker count ``value`` (``auto``, an int, or its string) stands for, with ``threads`` per worker."""
    if value is None or value == "auto":
        return auto_workers(threads)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not is_int(value) or value < 1:
        raise ConfigError(f"{key} must be auto or an integer >= 1, got {value!r}")
    return value


def resolve_progress(value: Any, key: str = "progress", stream: Any = None) -> bool:
    """Whether to draw progress bars: ``auto`` draws them only when ``stream`` (default stderr) is a terminal."""
    if isinstance(value, str):
        v = value.strip().lower()
        value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(v, v)
    if value == "auto":
        stream = sys.stderr if stream is None else stream
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):  # closed or not a file
            return False
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be {PROGRESS_ACCEPTED}, got {value!r}")
    return value


__all__ = ["auto_threads", "auto_workers", "resolve_progress", "resolve_threads", "resolve_workers", "set_threads"]
