"""Progress of long loops: bars on a terminal, an up-front estimate, and a line a minute elsewhere.

Every long loop of the library (training steps, compensation steps, chips evaluated or calibrated) draws a tqdm
bar when its ``progress`` is true (``None``, the library default: only when stderr is a terminal) and reports
through a :class:`Pace`: once its first units are measured and the whole loop would take more than a minute, an
estimate of its time; and, when no bar is drawn, a line at most once a minute. Both are log records of the
``correctnet`` loggers (INFO); records the command line shows on its console carry ``extra=CONSOLE``
(:class:`ConsoleFilter`), everything else goes to the run's log file only.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("correctnet")

CONSOLE = {"console": True}  # ``extra=`` of the log records the command line prints on its console


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``progress``: ``None`` lets tqdm draw the bar only on a terminal."""
    return None if progress is None else not progress


def duration(seconds: float) -> str:
    """``seconds`` as a short human duration: ``45 s``, ``12 min``, ``3.5 h``, ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Pace:
    """Reports the pace of a loop of ``total`` units (``done`` of them already done, e.g. on resume).

    After the first units (at least 2, and at least ``measure_s`` seconds or 50 units), when the loop would take
    more than ``long_s`` seconds in all, one console line estimates its time from the measured rate (the first unit,
    which pays one-off costs, is left out of the rate). Without a bar (``bar=False``), a line with the units done and
    the time left at most every ``interval_s`` seconds (console too). Call :meth:`update` after each unit(s).
    """

    def __init__(self, desc: str, total: int, *, unit: str = "step", done: int = 0, bar: bool = False,
                 interval_s: float = 60.0, long_s: float = 60.0, measure_s: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter, logger: logging.Logger | None = None) -> None:
        self.desc, self.total, self.unit, self.bar = desc, total, unit, bar
        self.interval_s, self.long_s, self.measure_s = interval_s, long_s, measure_s
        self.clock, self.log = clock, logger or log
        self.count = self.first = done
        self.t0 = self.t_first = self.last = clock()
        self.started = False
        self.estimate: float | None = None  # the loop's estimated total seconds, once measured

    def _rate(self) -> float:
        return (self.clock() - self.t_first) / max(self.count - self.first, 1)

    def update(self, n: int = 1) -> None:
        now = self.clock()
        if not self.started:  # the first unit(s) pay one-off costs: the rate starts after them
            self.started = n > 0
            self.count += n
            self.first, self.t_first = self.count, now
            return
        self.count += n
        left = max(self.total - self.count, 0) * self._rate()
        if self.estimate is None and self.count - self.first >= 1 and (
                now - self.t_first >= self.measure_s or self.count - self.first >= 50):
            self.estimate = now - self.t0 + left
            if self.estimate > self.long_s:
                self.log.info("%s: about %s for %d %ss (%.3g s per %s, measured on the first %d)", self.desc,
                              duration(self.estimate), self.total, self.unit, self._rate(), self.unit, self.count,
                              extra=CONSOLE)
        if not self.bar and now - self.last >= self.interval_s and self.count < self.total:
            self.last = now
            self.log.info("%s: %d/%d %ss, about %s left", self.desc, self.count, self.total, self.unit,
                          duration(left), extra=CONSOLE)


class ConsoleFilter(logging.Filter):
    """Passes the records meant for the console: warnings and errors, and records logged with ``extra=CONSOLE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "console", False))


class ConsoleFormatter(logging.Formatter):
    """The message alone for information, ``warning: ...`` / ``error: ...`` before the others."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


__all__ = ["CONSOLE", "ConsoleFilter", "ConsoleFormatter", "Pace", "bar_disabled", "duration"]
