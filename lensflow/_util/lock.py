"""One writer per output: an OS file lock beside the target, held for a job's life.

``target_lock(out)`` takes ``fcntl.flock`` on ``.<name>.lock`` beside ``out``; a second run on the same target
is refused at once (:class:`TargetBusyError`, one line). The kernel drops the lock when its process dies, so a
``kill -9``'d run leaves nothing that blocks the rerun, which then resumes. Holding the lock also makes it safe
to remove the hidden temporaries (``.<name>.XXXXXXXX.tmp``) that killed runs left beside the target:
:func:`remove_stale_temporaries` runs under the lock, when no live writer of that target can own them.

The lock is re-entrant within one process (a job holds it and its writers take it again), and its file is
removed on release (the acquirer re-checks the inode, so an unlink never lets two holders in).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from lensflow._util.log import get_logger

__all__ = ["TargetBusyError", "check_writable", "lock_path", "remove_stale_temporaries", "target_lock"]

log = get_logger(__name__)

_held: dict[str, tuple[int, int]] = {}  # lock file -> (fd, depth): re-entrant within this process
_guard = threading.Lock()


class TargetBusyError(RuntimeError):
    """Another live process holds the output's lock (exit code 2: the command was refused, nothing written)."""

    exit_code = 2


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in its folder."""
    p = Path(os.path.abspath(target))
    return p.with_name(f".{p.name}.lock")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(target: str | os.PathLike, *, what: str = "out", folder: bool = False) -> None:
    """Raise a one-line ``PermissionError`` unless a file can be created beside ``target`` (in its folder, or the
    nearest existing ancestor when the folder is still to be made; with ``folder``, in ``target`` itself). A real
    probe, not ``os.access``: root passes ``access`` on a read-only mount's permissions but not its ``EROFS``."""
    p = Path(os.path.abspath(target))
    folder = _nearest_existing(p if folder else p.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".lensflow-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            e.errno or errno.EACCES, f"{what}: {target}: cannot write in {folder} ({os.strerror(e.errno or 13)})"
        ) from None


def _acquire(lp: Path, target: Path, wait: bool) -> int:
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = lp.read_text().strip()
            except OSError:
                holder = ""
            who = f" (process {holder})" if holder.isdigit() else ""
            raise TargetBusyError(
                f"{target}: another lensflow run is writing it{who}; wait for it to end (lock {lp})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder we waited for unlinked it: lock the new file instead
            with contextlib.suppress(OSError):  # the holder's pid, for the busy message only (a full disk is fine)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def target_lock(target: str | os.PathLike, *, clean: bool = True, wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` for the block; yields the lock file's path.

    With ``wait``, block until the holder ends instead of refusing (a cache filled by whoever comes first).

    Raises :class:`TargetBusyError` when another live process holds it, ``PermissionError`` (one line) when the
    folder is not writable. With ``clean``, removes stale temporaries of ``target`` once the lock is held.
    """
    target = Path(target)
    lp = lock_path(target)
    key = str(lp)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            outer = False
        else:
            check_writable(target)
            lp.parent.mkdir(parents=True, exist_ok=True)
            fd = _acquire(lp, target, wait)
            _held[key] = (fd, 1)
            outer = True
    try:
        if outer and clean:
            remove_stale_temporaries(target)
        yield lp
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                with contextlib.suppress(OSError):
                    os.unlink(lp)  # while still locked: a waiter re-checks the inode
                os.close(fd)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries killed runs left beside ``target`` (``.<name>.XXXXXXXX.tmp`` files and folders of
    :mod:`lensflow._util.atomic`, ``.<name>.old-PID`` folders); call it only while holding :func:`target_lock`.
    Returns what was removed (each is logged)."""
    p = Path(os.path.abspath(target))
    if not p.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(p.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)$")
    removed = []
    for entry in p.parent.iterdir():
        if not pattern.match(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as e:
            log.warning("warning: could not remove the stale temporary %s: %s", entry, e.strerror)
            continue
        log.warning("warning: removed %s, a temporary of an earlier run that did not finish", entry)
        removed.append(entry)
    return removed
