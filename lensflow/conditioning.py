"""Conditions of a conditional model: the one parser of physical parameter values.

A model conditioned on ``param_names`` (e.g. ``("Omega_m", "sigma_8")``) takes one row of physical values
per map. They can be given as

* a dict ``{name: value or [n] values}`` (a scalar is broadcast to every map): :func:`condition_rows`;
* an array ``[n, P]`` (or one row ``[P]``, broadcast) in the order of ``param_names``: :func:`condition_rows`;
* a dict ``{name: value or list}`` meaning the Cartesian product of the lists, the first name varying
  slowest (``python -m lensflow.generate cond.Omega_m=[0.25,0.3]``): :func:`condition_grid`.

The network sees them normalised with the training-split mean and standard deviation
(:func:`normalize_conditions`). An unconditional model takes ``None`` (or an empty dict) and nothing else.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["condition_grid", "condition_rows", "normalize_conditions"]


def _is_empty(cond: Any) -> bool:
    if cond is None:
        return True
    if isinstance(cond, Mapping):
        return not cond
    return np.size(_array(cond)) == 0


def _array(x: Any, name: str = "cond") -> np.ndarray:
    """``x`` as float64; a one-line ``ValueError`` naming ``name`` (``cond['Omega_m']``) for non-numbers."""
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: values must be numbers, got {x!r}"[:200]) from None


def _check_presence(cond: Any, names: Sequence[str]) -> bool:
    """``False`` for an unconditional model given nothing; raises when presence and model disagree."""
    if not names:
        if not _is_empty(cond):
            given = sorted(cond) if isinstance(cond, Mapping) else "values"
            raise ValueError(f"cond: the model is unconditional, but conditions {given} were given; pass cond=None")
        return False
    if _is_empty(cond):
        raise ValueError(
            f"cond: the model is conditioned on {list(names)}; pass values for them (e.g. cond.{names[0]}=0.3)"
        )
    if isinstance(cond, Mapping):
        unknown = sorted(set(cond) - set(names))
        if unknown:
            raise ValueError(f"cond: unknown condition(s) {unknown}; the model is conditioned on {list(names)}")
        missing = [k for k in names if k not in cond]
        if missing:
            raise ValueError(
                f"cond: missing value(s) for {missing}; the model is conditioned on {list(names)} "
                f"(e.g. cond.{missing[0]}=0.3)"
            )
    return True


def condition_rows(cond: Any, param_names: Sequence[str], n: int | None = None) -> np.ndarray | None:
    """Per-map conditions float64 ``[n, P]`` in the order of ``param_names`` (``None`` if unconditional).

    Args:
        cond: ``None``, a dict ``{name: value or [m] values}`` or an array/tensor ``[m, P]`` / ``[P]``.
        param_names: the model's conditioning parameters.
        n: the number of maps; one row (or scalar dict values) is broadcast to it. ``None``: as many rows
            as given (the longest dict value).
    """
    names = [str(p) for p in param_names]
    if not _check_presence(cond, names):
        return None
    if isinstance(cond, Mapping):
        cols = [_array(cond[k], f"cond[{k!r}]").reshape(-1) for k in names]
        m = max(c.size for c in cols) if n is None else n
        for k, c in zip(names, cols, strict=True):
            if c.size not in (1, m):
                raise ValueError(f"cond[{k!r}]: expected 1 or {m} values, got {c.size}")
            if not np.isfinite(c).all():
                raise ValueError(f"cond[{k!r}]: values must be finite, got {c.tolist()}"[:200])
        rows = np.stack([np.broadcast_to(c, (m,)) for c in cols], axis=1)
    else:
        rows = _array(cond)
        if rows.ndim == 1:
            rows = rows[None]
        if rows.ndim != 2 or rows.shape[1] != len(names):
            raise ValueError(f"cond must have shape [n, {len(names)}] ({names}), got {tuple(rows.shape)}")
        if n is not None and rows.shape[0] != n:
            if rows.shape[0] != 1:
                raise ValueError(f"cond has {rows.shape[0]} rows for {n} maps")
            rows = np.broadcast_to(rows, (n, len(names)))
    if not np.isfinite(rows).all():
        raise ValueError("cond: values must be finite")
    return np.ascontiguousarray(rows)


def condition_grid(cond: Mapping[str, Any] | None, param_names: Sequence[str]) -> np.ndarray:
    """Conditions float64 ``[K, P]``: the Cartesian product of the values in ``cond``, first name slowest.

    ``cond`` maps each name to a number or a list of numbers. An unconditional model takes no conditions
    and gives one empty row ``[1, 0]``.
    """
    cond = dict(cond or {})
    names = [str(p) for p in param_names]
    if not _check_presence(cond, names):
        return np.zeros((1, 0))
    axes = []
    for name in names:
        v = cond[name]
        vals = list(v) if isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes)) else [v]
        if not vals:
            raise ValueError(f"cond.{name}: empty list of values")
        try:
            arr = np.array([float(x) for x in vals])
        except (TypeError, ValueError):
            raise ValueError(f"cond.{name}: values must be numbers, got {v!r}") from None
        if not np.isfinite(arr).all():
            raise ValueError(f"cond.{name}: values must be finite, got {v!r}")
        axes.append(arr)
    return np.array(list(itertools.product(*axes)), dtype=np.float64).reshape(-1, len(names))


def normalize_conditions(rows: Any, mean: torch.Tensor, std: torch.Tensor, log: bool = False) -> torch.Tensor | None:
    """``(rows - mean) / std`` (``(log rows - mean) / std`` with ``log``) in float64, returned as float32 on
    ``mean``'s device (what the Glow takes).

    ``rows`` are physical values ``[n, P]`` (array or tensor; ``None`` for an unconditional model);
    ``mean``/``std`` ``[P]`` are the training-split statistics of the values or of their logs (float64 buffers of
    the model).
    """
    if rows is None:
        return None
    c = torch.as_tensor(rows, dtype=torch.float64).to(mean.device)
    if log:
        if not bool(torch.all(c > 0)):
            raise ValueError(f"cond: this model conditions on log θ and needs positive values, got min {c.min():g}")
        c = torch.log(c)
    return ((c - mean) / std).to(torch.float32)
