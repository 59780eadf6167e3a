"""Atomic writes: a reader sees the old file or the whole new one, never a part, and a crash
leaves at most a `<name>.tmp-<host>-<pid>-*` file beside the target (never a file that looks
complete; <host> is the host's name and PID namespace), which the next write of the same target
removes once that process is gone. A folder replaced in place is first moved aside as
`<name>.old-<host>-<pid>-*/x`; a process killed between the two renames leaves no folder at
`<name>`, and the next write of it puts the old one back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from influence_jax.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_umask_allows(path: str, folder: bool = False) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; a finished output gets what the umask allows, like
    any file the user creates."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _host() -> str:
    """This host's name as it goes into temporary names, with its PID namespace where /proc
    tells it: containers that share a hostname (host networking) number their processes apart,
    so a pid is only looked up among the processes of the namespace that wrote it."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    try:
        return f"{host}_{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def temp_prefix(path: str, kind: str = "tmp") -> str:
    """`<name>.tmp-<host>-<pid>-` (`kind` "old": a replaced folder moved aside): whose temporary
    file or folder it is, so that a later writer of the same target can tell one left by a
    killed process (`clear_dead_temps`)."""
    return f"{os.path.basename(path)}.{kind}-{_host()}-{os.getpid()}-"


def clear_dead_temps(path: str) -> list[str]:
    """Removes the temporary files and folders of `path` (beside it) that a process of this host
    which no longer runs left behind (killed before its cleanup); returns their names. Those of
    live processes, or of other hosts (a shared folder), are kept. Where `path` is missing and
    such a process had moved the folder there aside (`replace_folder`, killed between its two
    renames), that folder is put back first."""
    folder, name = os.path.split(os.path.abspath(path))
    host, removed = _host(), []
    entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for kind in ("old", "tmp"):  # a folder put back first, then the temporary ones
        start = f"{name}.{kind}-{host}-"
        for entry in entries:
            if not entry.startswith(start):
                continue
            pid = entry[len(start) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove_dead(os.path.join(folder, entry), path, kind)
                removed.append(entry)
    return removed


def _remove_dead(target: str, path: str, kind: str) -> None:
    aside = os.path.join(target, "x")
    if kind == "old" and os.path.lexists(aside) and not os.path.lexists(path):
        os.replace(aside, path)  # the last whole version
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def entries(folder: str) -> set[str] | None:
    """The names in `folder`; None where there is no such folder (or it is a URI)."""
    if "://" in folder:
        return None
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` on a temporary path in the target's folder, then renames it to `path`
    (temporary files a killed writer left there go first)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clear_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if os.path.isfile(tmp):
            _as_umask_allows(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str, commit: bool = True) -> Iterator[str]:
    """Yields a temporary folder beside `path` to fill; on success it replaces `path` (an old
    folder there is removed once the new one is in place), on an error it is removed, so `path`
    never holds a half-written report. `commit=False` (a process that does not write, in a
    multi-process run) only removes it."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clear_dead_temps(path)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(path), dir=parent)
    try:
        yield tmp
        if commit:
            replace_folder(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: str, path: str) -> None:
    """Puts the filled folder `tmp` in place of `path` (a file or folder there is moved aside
    first and removed once the new one is in place), with the modes the umask allows."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    _as_umask_allows(tmp, folder=True)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=parent)
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any, sort_keys: bool = True) -> None:
    """`obj` as indented JSON, atomically; `sort_keys=False` keeps a report's own order."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def read_json(path: str) -> Any | None:
    """The JSON in `path`, or None when there is no such file; DataError naming the file and
    place when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise DataError(f"{path}: not valid JSON ({e.msg} at {where})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text)") from None


def write_table(table: pa.Table, path: str, fmt: str = "parquet") -> None:
    """Writes `table` as Parquet or CSV atomically."""
    if fmt not in ("parquet", "csv"):
        raise DataError(f"--format must be parquet or csv, not {fmt!r}")
    write_atomic(
        path, lambda tmp: (pq.write_table if fmt == "parquet" else pcsv.write_csv)(table, tmp)
    )


TABLE_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def table_format(path: str, fmt: str, explicit: bool) -> str:
    """The format of a table written to `path`: its extension's (.parquet/.pq, .csv), which an
    `explicit` --format must agree with; `fmt` for other names. DataError on a mismatch."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gz":
        raise DataError(f"--output={path}: the table is not compressed; drop the .gz")
    by_name = TABLE_EXTENSIONS.get(ext)
    if by_name and explicit and fmt != by_name:
        raise DataError(
            f"--format={fmt} does not match --output={path} ({by_name}); name the file "
            f"with .{fmt} or leave --format out"
        )
    return by_name or fmt


def check_output(
    path: str, flag: str, folder: bool = False, replaces: tuple[str, ...] = ()
) -> None:
    """Raises DataError unless `path` (a file, or a folder with `folder`) can be written, before
    any work is done: not a folder where a file goes (or the reverse), no file in the way of
    its parent folders, and a writable place to create them. `replaces`: the files that mark
    a folder this tool wrote; an existing folder with none of them is not replaced unless
    empty (it may hold the user's files)."""
    p = os.path.abspath(path)
    if folder and os.path.exists(p) and not os.path.isdir(p):
        raise DataError(f"--{flag}={path}: exists and is not a folder")
    if folder and replaces and os.path.isdir(p) and os.listdir(p):
        if not any(os.path.exists(os.path.join(p, name)) for name in replaces):
            raise DataError(
                f"--{flag}={path}: a folder that is not this tool's output (none of "
                f"{', '.join(replaces)}) and would be replaced; remove it or choose another path"
            )
    if not folder and os.path.isdir(p):
        raise DataError(f"--{flag}={path}: is a folder; give a file path")
    existing = p if folder else os.path.dirname(p)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"--{flag}={path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DataError(f"--{flag}={path}: cannot write in {existing} ({e.strerror})") from None
