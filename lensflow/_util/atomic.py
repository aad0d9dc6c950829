"""Atomic output: write beside the target, then rename into place, with the user's umask.

``tempfile.mkstemp`` creates files with mode 0600 whatever the umask, so a plain temp-file-and-rename
leaves stores and reports that collaborators on a shared cluster cannot read. Every writer goes
through :func:`atomic_path`, which gives the final file the mode a plain ``open(path, "w")`` would
(0666 & ~umask) and never leaves a half-written target behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "default_dir_mode",
    "default_mode",
    "ensure_free_space",
    "fsync_path",
    "replace_into_place",
    "temp_beside",
    "write_json",
    "write_text",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a newly created regular file gets under the current umask (0666 & ~umask)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a newly created folder gets under the current umask (0777 & ~umask)."""
    return 0o777 & ~_umask()


def replace_into_place(tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Give ``tmp`` the umask's mode, flush it to disk and rename it onto ``path`` (atomic on one filesystem).

    With ``overwrite`` false the last step never clobbers: ``tmp`` is hard-linked to ``path`` (which fails when
    ``path`` appeared meanwhile, e.g. from a concurrent run) and then unlinked; ``FileExistsError`` leaves ``tmp``
    for the caller to remove. Filesystems without hard links fall back to a check and a rename.
    """
    os.chmod(tmp, default_mode())
    fsync_path(tmp)
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(
                f"{path}: appeared while this run wrote it (another run?); left it as it is"
            ) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(path):
                raise FileExistsError(f"{path}: appeared while this run wrote it (another run?); left it") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    try:  # the rename is done and the file complete: a folder that cannot sync is worth a warning, no more
        fsync_path(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        logging.getLogger(__name__).warning("warning: %s", e)


#: Free space a writer keeps in hand beyond what it is about to write [bytes]. HDF5 flushes its chunk cache and
#: metadata at close, and an HDF5 file whose write failed cannot be closed (h5py 3.16 / HDF5 2.0 crash the
#: interpreter), so writers refuse before the disk is full rather than let HDF5 hit it.
SPACE_MARGIN = 4 << 20


def ensure_free_space(path: str | os.PathLike, nbytes: int = 0) -> None:
    """Raise ``OSError(ENOSPC)`` (one line naming ``path``) unless its folder has ``nbytes`` + :data:`SPACE_MARGIN`
    bytes free for this user."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    need = int(nbytes) + SPACE_MARGIN
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{path}: No space left on device ({free / 2**20:.1f} MiB free in {folder}, "
            f"{need / 2**20:.1f} MiB needed); nothing was written under the final name",
        )


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or folder by path (a folder: so a rename in it survives a crash); errors of filesystems
    that cannot sync folders are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None  # one line naming the file
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: the final file; its folder is created if needed.
        overwrite: refuse (``FileExistsError``) when ``path`` exists and this is false.
        suffix: suffix of the temporary name (some writers pick the format from it, e.g. ``.fits``).
    """
    path = Path(path)
    tmp = temp_beside(path, overwrite=overwrite, suffix=suffix)
    try:
        yield tmp
        replace_into_place(tmp, path, overwrite=overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_beside(path: str | os.PathLike, *, overwrite: bool = True, suffix: str = ".tmp") -> Path:
    """A new empty temporary file beside ``path`` (its folder is created), for writers that manage their own
    lifetime (:class:`lensflow.mapstore.MapStoreWriter`); finish with :func:`replace_into_place`.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is false, ``IsADirectoryError`` when it
    is a folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=true to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: output path is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (a folder or file), on
    error it is removed. The folder gets the mode a plain ``mkdir`` would (0777 & ~umask), not mkdtemp's 0700.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=true to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_dir_mode())
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (no NaN; see :func:`lensflow._util.plain.to_plain`) atomically."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
