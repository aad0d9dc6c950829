"""Progress bars: one tqdm on stderr, shown on global rank 0 only and only when asked for."""

from __future__ import annotations

import sys
from typing import Any

from lensflow._util.log import global_rank

__all__ = ["progress"]


def progress(total: int | None, *, unit: str, desc: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar of ``total`` steps on the current ``sys.stderr`` (a silent one when disabled or not rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled or global_rank() != 0, file=sys.stderr)
