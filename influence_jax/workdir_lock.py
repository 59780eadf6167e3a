"""One training run per workdir: a lock file that names its holder, taken before any checkpoint or
event file is touched and released at the end (also on an error).

The lock is `fcntl.flock` on WORKDIR/train.lock, held open for the whole run. The kernel drops a
flock when its process dies, so a run killed with SIGKILL leaves no lock behind on this host: the
next run finds the file (which still names the dead holder), takes the lock over and logs a
warning. Other hosts: NFS carries flock across hosts, but some shared file systems only lock
within one host; so a record left by a process on another host is trusted while its heartbeat
(the file's modification time, touched every HEARTBEAT_S by the holder) is younger than STALE_S,
and taken over after that. Paths with a scheme (gs://...) and file systems without locks run
without a lock, with a logged note.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator

from absl import logging

from influence_jax.errors import WorkdirInUseError

HEARTBEAT_S = 60  # seconds between the holder's touches of the lock file
STALE_S = 600  # a record from another host with no heartbeat for this long is taken over
_MAX_COMMAND = 300  # characters of the holder's command line quoted in a message


def _record() -> dict:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(argv),
    }


def describe(holder: dict) -> str:
    """`holder` (a lock record) in words: pid, host, start time and command."""
    cmd = str(holder.get("command", "?"))
    if len(cmd) > _MAX_COMMAND:
        cmd = cmd[: _MAX_COMMAND - 3] + "..."
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}, command: {cmd}"
    )


def _read(fd: int) -> dict | None:
    """The record in the open lock file, {} for an unreadable one, None for an empty file."""
    raw = os.pread(fd, 64 << 10, 0)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _open_locked(path: str) -> tuple[int, dict | None]:
    """(fd, previous record) of `path`, opened (created if need be) and flocked by us.

    Raises:
      WorkdirInUseError: another live process holds the lock.
      OSError: the file system has no flock (ENOLCK, EOPNOTSUPP, ...).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or {}
            os.close(fd)
            raise _in_use(path, holder) from None
        except OSError:
            os.close(fd)
            raise
        # The holder unlinks the file before it lets go: a lock on an unlinked file is no lock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read(fd)
        os.close(fd)


def _in_use(path: str, holder: dict) -> WorkdirInUseError:
    workdir = os.path.dirname(path) or "."
    return WorkdirInUseError(
        f"--workdir={workdir} is in use by another training run ({describe(holder)}); wait for "
        "it, or stop it; if that process is gone, the lock is taken over automatically"
    )


def _check_stale(path: str, fd: int, holder: dict) -> None:
    """Logs the take-over of a record left by a run that ended without releasing the lock, or
    raises WorkdirInUseError for a record from another host that may still be alive."""
    if holder.get("host") not in (None, socket.gethostname()):
        age = time.time() - os.fstat(fd).st_mtime
        if age < STALE_S:
            workdir = os.path.dirname(path) or "."
            raise WorkdirInUseError(
                f"--workdir={workdir} is in use by a training run on another host "
                f"({describe(holder)}; last heartbeat {age:.0f} s ago); wait for it, or stop "
                f"it; if that process is gone, the lock is taken over automatically "
                f"{STALE_S // 60} minutes after its last heartbeat (or delete {path})"
            )
    logging.warning(
        "%s: taking over the lock of a run that ended without releasing it (%s)",
        path,
        describe(holder) if holder else "no readable record",
    )


def _heartbeat(fd: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(fd)


@contextlib.contextmanager
def hold(path: str, enabled: bool = True) -> Iterator[None]:
    """Holds the lock file `path` for the `with` block; `enabled=False` (the processes other
    than 0 of a multi-process run) does nothing.

    Raises:
      WorkdirInUseError: another run holds the lock; the message names it and what to do.
    """
    if not enabled:
        yield
        return
    if "://" in path:
        logging.info("%s: not locked (a path with a scheme has no file locks)", path)
        yield
        return
    try:
        fd, holder = _open_locked(path)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        logging.warning(
            "%s: this file system has no file locks (%s); running without a lock: make sure no "
            "other run uses this workdir",
            path,
            e.strerror,
        )
        fd = None
    if fd is None:
        yield
        return
    try:
        if holder is not None:
            _check_stale(path, fd, holder)
    except BaseException:
        os.close(fd)  # the file and its record stay: they are another run's
        raise
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fd, stop), daemon=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
        os.fsync(fd)
        beat.start()
        yield
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()  # before the fd is closed: it must not touch a reused descriptor
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the flock goes, so that no one locks a file about to vanish
        os.close(fd)
