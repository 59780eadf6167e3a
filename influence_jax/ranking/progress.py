"""Resumable ranking: each scored block's top k is kept beside the output until the output is
written, so that a ranking killed (preempted, out of memory, Ctrl-C) and run again with the same
settings scores only the blocks it had not finished.

The blocks of a ranking (whole users each, `block_pairs` pairs) come in the same order on every
run of the same settings, so block i of a rerun is block i of the killed run. OUTPUT.progress/
holds, per process, `p<process>-settings.json` (what the blocks were scored with: the run and
its step, the candidates and their files, the time ranked as of, top k, ...) and one
`p<process>-block-<i>.npz` per finished block (its kept pairs, scores and ranks), each written
to a temporary name and renamed. Settings that differ in any way start the ranking over (the
old blocks are removed, with a line in the log). The folder goes once the output is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from influence_jax import files
from influence_jax.errors import DataError

KEPT = ("ctx_row", "item_row", "user_out", "item_out", "prob", "ranks")  # a block's arrays


def file_identity(path: str | None) -> list | None:
    """(absolute path, size, modification time) of an input file or folder: part of the
    settings."""
    if not path:
        return None
    if not os.path.exists(path):
        return [os.path.abspath(path), None, None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


class BlockStore:
    """The finished blocks of one process's share of a ranking (module doc)."""

    def __init__(
        self, output: str, settings: dict[str, Any], process: int, log: Callable[[str], None]
    ):
        self.folder = output.rstrip("/") + ".progress"
        self.prefix = f"p{process:03d}-"
        self.settings = json.loads(json.dumps(settings, default=str))
        self.log = log
        self._remove(self._temps())  # a block half-written when this process's rank was killed
        try:
            saved = files.read_json(self._path("settings.json"))
        except DataError:
            saved = None  # damaged: start anew
        found = self._blocks()
        if found and saved != self.settings:
            log(
                f"{self.folder}: {len(found)} blocks of a ranking with other settings; "
                "starting anew"
            )
            self._remove(found)
            found = []
        if found:
            n = f"{len(found)} block{'s' if len(found) != 1 else ''}"
            log(f"resuming: {n} already scored are read from {self.folder}")
        self.resumed = len(found)
        self._settings_written = bool(found)  # else with the first block saved

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, self.prefix + name)

    def _block_path(self, i: int) -> str:
        return self._path(f"block-{i:06d}.npz")

    def _temps(self) -> list[str]:
        names = os.listdir(self.folder) if os.path.isdir(self.folder) else []
        return [n for n in names if n.startswith(self.prefix + "tmp-")]

    def _blocks(self) -> list[str]:
        names = os.listdir(self.folder) if os.path.isdir(self.folder) else []
        start = self.prefix + "block-"
        return sorted(n for n in names if n.startswith(start) and n.endswith(".npz"))

    def load(self, i: int) -> dict[str, np.ndarray] | None:
        """Block i's kept arrays, or None if it was not finished (or cannot be read)."""
        path = self._block_path(i)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in KEPT}
        except (OSError, ValueError, KeyError, EOFError):
            return None  # scored again

    def save(self, i: int, kept: dict[str, np.ndarray]) -> None:
        """Writes block i's kept arrays (temporary name, then rename)."""
        arrays = {k: _storable(kept[k]) for k in KEPT}
        if not self._settings_written:  # nothing is left behind before a block is finished
            os.makedirs(self.folder, exist_ok=True)
            files.write_json(self._path("settings.json"), self.settings)
            self._settings_written = True
        fd, tmp = tempfile.mkstemp(prefix=self.prefix + "tmp-", suffix=".npz", dir=self.folder)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, self._block_path(i))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def finish(self) -> None:
        """Removes this process's blocks and settings; the folder once it is empty."""
        if not os.path.isdir(self.folder):
            return
        self._remove(self._blocks() + self._temps() + [self.prefix + "settings.json"])
        try:
            os.rmdir(self.folder)
        except OSError:
            pass  # another process's blocks are still there

    def _remove(self, names: list[str]) -> None:
        for n in names:
            try:
                os.remove(os.path.join(self.folder, n))
            except FileNotFoundError:
                pass


def _storable(a: np.ndarray) -> np.ndarray:
    """`a` without Python objects (string ids as a unicode array), so no pickle is needed."""
    a = np.asarray(a)
    return a.astype(str) if a.dtype == object else a
