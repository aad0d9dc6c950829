"""Argument checks: one vocabulary and one message style (``NAME must be ..., got VALUE``).

Every check raises ``ValueError`` naming the argument, so a command line turns it into one
``error:`` line (see :mod:`lensflow.cli`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_optional_int"]


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    return v


def check_optional_int(name: str, value: Any, minimum: int | None = 1) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite float; ``strict_min`` makes the lower bound exclusive (``> minimum``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number{_bounds(minimum, maximum, strict_min)}, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if minimum is not None:
        bad |= v <= minimum if strict_min else v < minimum
    if maximum is not None:
        bad |= v > maximum
    if bad:
        raise ValueError(f"{name} must be a finite number{_bounds(minimum, maximum, strict_min)}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(str, options))}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A real boolean (YAML ``true``/``false``), not a string or a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _bounds(lo: float | None, hi: float | None, strict: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if strict else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return (" " + " and ".join(parts)) if parts else ""
