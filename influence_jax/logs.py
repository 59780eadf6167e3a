"""Log hygiene for entry points: keeps the checkpoint and data libraries' chatter out of ours;
and the progress line (done, rate, ETA) of long jobs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from absl import logging as absl_logging


class _QuietLibraries(logging.Filter):
    def __init__(self, libs: tuple[str, ...], min_level: int):
        super().__init__()
        self.parts, self.min_level = tuple(f"{os.sep}{lib}{os.sep}" for lib in libs), min_level

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(p in record.pathname for p in self.parts)
        return record.levelno >= self.min_level or not noisy


def quiet_libraries(min_level: int = logging.WARNING, libs: tuple[str, ...] = ("orbax", "grain")):
    """Drops records below `min_level` that come from `libs` (Orbax and Grain log every save)."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries(libs, min_level))


class _Plain(logging.Formatter):
    """The terminal's lines: the message alone, with the level named for warnings and errors
    (absl's prefix, `I1204 14:09:13.219846 139849122507648 loop.py:211]`, stays in the file)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def plain_terminal_and_file(path: str | None) -> None:
    """Plain lines on the terminal; with `path`, every line also goes to that file (appended)
    with absl's prefix (level, time, thread, file:line) and the same library filters."""
    handler = absl_logging.get_absl_handler()
    handler.setFormatter(_Plain())
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        file = logging.FileHandler(path)
        file.setFormatter(absl_logging.PythonFormatter())
        for f in handler.filters:
            file.addFilter(f)
        logging.getLogger().addHandler(file)


def error_to_files(message: str) -> None:
    """Writes an ERROR line to the log files of `plain_terminal_and_file` only (the terminal
    gets the message from sys.exit), so a run's log says why it stopped."""
    to_files(message, logging.ERROR)


def to_files(message: str, level: int = logging.INFO) -> None:
    """Writes `message` to the log files of `plain_terminal_and_file` only: for the lines a run
    prints on stdout (its final metrics and summary), so that train.log holds them too."""
    record = logging.LogRecord("absl", level, __file__, 0, "%s", (message,), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def hms(seconds: float) -> str:
    """H:MM:SS of a duration."""
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Reports "scored D/N pairs (P%) R pairs/s ETA H:MM:SS" at most every `every` seconds and
    once at the end; the rate counts from the first call (so it includes compilation)."""

    def __init__(
        self,
        total: int,
        log: Callable[[str], None],
        every: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        verb: str = "scored",
        unit: str = "pairs",
    ):
        self.total, self.log, self.every, self.clock = total, log, every, clock
        self.verb, self.unit = verb, unit
        self.t0 = clock()
        self.last = self.t0
        self.done = 0
        self.skipped = 0  # done without work (a resumed ranking's kept blocks): not in the rate

    def skip(self, n: int) -> None:
        """Counts `n` more as done that took no time (the rate and ETA leave them out)."""
        self.skipped += n

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = (self.done - self.skipped) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_s = hms(eta) if eta != float("inf") else "?"
        return (
            f"{self.verb} {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%) "
            f"{rate:,.0f} {self.unit}/s ETA {eta_s}"
        )

    def __call__(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if done >= self.total or now - self.last >= self.every:
            self.last = now
            self.log(self.line())
