"""Plain Python types from configs, arrays and paths: the one converter for JSON, hparams and records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["merge", "to_plain"]


def to_plain(obj: Any, *, nan_to_none: bool = False) -> Any:
    """``obj`` as dicts, lists, str, int, float, bool and None.

    OmegaConf containers (resolved), numpy and torch arrays and scalars, paths, tuples and sets are
    converted recursively; other leaves become ``str``. With ``nan_to_none`` non-finite floats become
    ``None`` (strict JSON has no NaN).
    """
    if _is_omegaconf(obj):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return None if nan_to_none and not math.isfinite(obj) else float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar
        return to_plain(obj.tolist(), nan_to_none=nan_to_none)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, nan_to_none=nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [to_plain(v, nan_to_none=nan_to_none) for v in sorted(obj, key=str)]
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        return [to_plain(v, nan_to_none=nan_to_none) for v in obj]
    return str(obj)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key (as OmegaConf merges configs).

    The one merge of a partial config over its defaults. The result is a new dict whose nested dicts and lists
    are copies: changing it changes neither input.
    """
    out = {k: _copy(v) for k, v in base.items()}
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else _copy(v)
    return out


def _copy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return merge({}, v)
    return [_copy(x) for x in v] if isinstance(v, list) else v


def _is_omegaconf(obj: Any) -> bool:
    # Checked by module name so the ground floor never imports omegaconf for non-config objects.
    return type(obj).__module__.startswith("omegaconf")
