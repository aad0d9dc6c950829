"""Provenance records: what produced an output (command, resolved config, versions).

Every store, checkpoint and report carries one, so a map can always be traced to the
command and configuration that made it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from lensflow._util.plain import to_plain

__all__ = ["provenance", "versions"]

_PACKAGES = ("lensflow", "torch", "lightning", "numpy", "scipy", "h5py", "healpy", "astropy", "pyccl", "glass")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape lensflow's numbers."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def provenance(config: Mapping[str, Any] | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """A JSON-serialisable record of the command, resolved config and software versions."""
    argv = sys.argv if command is None else command
    rec: dict[str, Any] = {
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "",
        "config": to_plain(dict(config)) if config is not None else None,
        "versions": versions(),
        "host": platform.node(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    commit = _git_commit()
    if commit:
        rec["git"] = commit
    return rec
