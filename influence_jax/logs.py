"""Log hygiene for entry points: keeps the checkpoint and data libraries' chatter out of ours."""

from __future__ import annotations

import logging
import os

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
