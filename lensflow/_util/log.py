"""Logging for library code: ``logging.getLogger("lensflow....")``, rank-zero filtered, never ``print``.

Commands call :func:`setup_logging` once; library modules only call ``get_logger(__name__)``. Under
DDP only global rank 0 emits INFO and below (ranks are read from the usual environment variables,
so the ground floor needs no Lightning); warnings and errors pass on every rank.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["get_logger", "global_rank", "setup_logging"]

_ROOT = "lensflow"


def global_rank() -> int:
    """The process's global rank from ``RANK``/``SLURM_PROCID``/``LOCAL_RANK`` (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.isdigit():
            return int(v)
    return 0


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is now (pytest and notebooks replace it), not the one at set-up."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the logging API's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or global_rank() == 0


def get_logger(name: str = _ROOT) -> logging.Logger:
    """A logger under the ``lensflow`` hierarchy (pass ``__name__``)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send ``lensflow`` records to stderr as plain lines, rank-zero filtered; idempotent."""
    root = logging.getLogger(_ROOT)
    if not any(getattr(h, "_lensflow", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankZero())
        handler._lensflow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    return root
