"""The lensflow checkpoint format: the ``"lensflow"`` entry, reading a checkpoint, refusing NaN/Inf.

A checkpoint is a Lightning checkpoint of plain data, so ``torch.load(path, weights_only=True)`` reads it:

* ``state_dict``: ``model.*``, the :class:`lensflow.model.KappaFlow` (``model.glow.*``: raw weights, which the
  optimizer state belongs to; ``model.glow_ema.*``: the EMA weights used for sampling; ``model.cond_mean``/
  ``model.cond_std``: physical units, or of ln θ with ``model.cond_log``; ``model.cond_low``/``model.cond_high``:
  the training box), and ``ema_steps``. lensflow 0.1 wrote the model's entries without the ``model.`` prefix
  (and without the box); :meth:`lensflow.model.KappaFlow.from_checkpoint` reads both. An export
  (:meth:`lensflow.model.KappaFlow.save`) holds the model's entries without prefix and no optimizer state;
* ``hyper_parameters``: plain dicts ``model, meta, npix, store, param_names, optim, check, seed, config``,
  where ``meta`` is the training store's :meth:`lensflow.mapstore.StoreMeta.to_dict`;
* ``"lensflow"``: format version, model kind ``"glow"``, the resolved run config, the training data
  (store path, metadata, map side, parameter names) and a provenance record;
* ``"lensflow_counters"``: the non-finite step counters of the run.

This module knows the format only, not the model class that is built from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickletools
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lensflow import __version__
from lensflow._util.hashing import sha256_file
from lensflow.mapstore import StoreMeta

__all__ = [
    "MODEL_KIND",
    "NonFiniteCheckpointError",
    "lensflow_entry",
    "read_checkpoint",
    "read_checkpoint_hashed",
    "refuse_nonfinite",
    "training_maps",
]

MODEL_KIND = "glow"


class NonFiniteCheckpointError(RuntimeError):
    """Refused to write a checkpoint with NaN/Inf parameters or optimizer state."""

    exit_code = 1


def refuse_nonfinite(checkpoint: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteCheckpointError` if a weight or optimizer tensor holds NaN/Inf."""
    for name, t in checkpoint.get("state_dict", {}).items():
        if _bad(t):
            raise NonFiniteCheckpointError(f"refusing to write a checkpoint: {name} has NaN/Inf values")
    for i, st in enumerate(checkpoint.get("optimizer_states", [])):
        for pid, s in st.get("state", {}).items():
            for k, t in s.items():
                if _bad(t):
                    raise NonFiniteCheckpointError(
                        f"refusing to write a checkpoint: optimizer {i} state {k!r} of parameter {pid} "
                        "has NaN/Inf values"
                    )


def _bad(t: Any) -> bool:
    return torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def lensflow_entry(
    *,
    config: Any,
    meta: StoreMeta,
    npix: int,
    store: str | None,
    param_names: Sequence[str],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``"lensflow"`` entry of a checkpoint (plain data)."""
    return {
        "version": __version__,
        "model": MODEL_KIND,
        "config": config,
        "data": {"store": store, "meta": meta.to_dict(), "npix": int(npix), "param_names": list(param_names)},
        "provenance": dict(provenance),
    }


def training_maps(hparams: Mapping[str, Any]) -> tuple[StoreMeta, int, str | None]:
    """``(meta, npix, store)`` of the training maps from a checkpoint's hyperparameters."""
    meta = hparams.get("meta")
    if meta is None or hparams.get("npix") is None:
        raise ValueError("hyper_parameters: no training-map metadata (meta/npix)")
    meta = meta if isinstance(meta, StoreMeta) else StoreMeta.from_dict(meta)
    store = hparams.get("store")
    return meta, int(hparams["npix"]), None if store is None else str(store)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Load a lensflow Glow checkpoint dict (``weights_only=True``), or raise a one-line ``ValueError``
    naming the file. ``mmap`` maps the tensors instead of reading them (cheap when only the
    hyperparameters are needed)."""
    p = _existing(path)
    return _checked(_load(p, p, map_location, mmap), p)


def read_checkpoint_hashed(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, Any], str]:
    """:func:`read_checkpoint` and the file's SHA-256, from one read of the file."""
    p = _existing(path)
    if p.stat().st_size > 1 << 31:  # very large files: hash and load separately rather than hold the bytes
        return read_checkpoint(p, map_location), sha256_file(p)
    data = p.read_bytes()
    ckpt = _checked(_load(io.BytesIO(data), p, map_location), p)
    return ckpt, hashlib.sha256(data).hexdigest()


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: checkpoint not found")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, not a checkpoint file")
    return p


def _load(src: Any, p: Path, map_location: Any, mmap: bool = False) -> Any:
    try:
        return torch.load(src, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling/format problem is a bad file to the user
        raise ValueError(f"{p}: {_why_unreadable(e, src)}") from None


def _why_unreadable(e: BaseException, src: Any) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words for the user: a file that holds code or objects (which
    lensflow never unpickles) or a damaged one. torch's own advice (to load with ``weights_only=False``) is never
    repeated: that runs whatever code the file holds."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the zip format's pickle names a blocked global
    names = [found.group(1)] if found else _pickle_globals(src)
    if names:
        return (
            f"contains objects lensflow will not unpickle ({', '.join(names[:3])}); a lensflow checkpoint holds "
            "plain data only (tensors, numbers, strings), so this file was not written by lensflow, or was altered"
        )
    return f"not a checkpoint (corrupt or truncated: {type(e).__name__} while reading it)"


def _pickle_globals(src: Any) -> list[str]:
    """The classes/functions a plain (non-zip) pickle file refers to; ``[]`` when it is not a complete pickle. The
    opcodes are only listed, nothing is executed."""
    try:
        data = src.getvalue() if isinstance(src, io.BytesIO) else Path(src).read_bytes()
        if zipfile.is_zipfile(io.BytesIO(data)):
            return []
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]
    except Exception:  # noqa: BLE001 - not a pickle: the caller reports a damaged file
        return []


def _checked(ckpt: Any, p: Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or "lensflow" not in ckpt:
        raise ValueError(f"{p}: not a lensflow checkpoint (no 'lensflow' entry)")
    info = ckpt["lensflow"]
    kind = info.get("model") if isinstance(info, dict) else None
    if kind != MODEL_KIND:
        raise ValueError(f"{p}: a lensflow checkpoint of model kind {kind!r}, not {MODEL_KIND!r}")
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{p}: lensflow checkpoint without hyper_parameters/state_dict")
    return ckpt
