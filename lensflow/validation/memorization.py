"""The memorisation check on map stores: which training maps, when it is skipped, and the streamed run.

The verdict itself is :func:`lensflow.compare.memorization_check`; here the training maps are read
batch by batch from their store, so memory stays constant in the training-set size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lensflow._util.progress import progress
from lensflow.compare import memorization_check
from lensflow.mapstore import MapStore, open_store
from lensflow.validation.config import MemorizationOptions
from lensflow.validation.measure import batches, check_compatible, store_record

__all__ = ["run_memorization"]


def _skip_reason(
    opts: MemorizationOptions, same: bool, train: MapStore, tidx: np.ndarray, ref_split: str
) -> str | None:
    """Why the check cannot run (the held-out maps are training maps, or there are no training maps)."""
    if same and (opts.training_split == ref_split or "all" in (opts.training_split, ref_split)):
        return (
            f"the held-out maps (reference split {ref_split!r}) overlap the training maps (split "
            f"{opts.training_split!r} of the same store)"
        )
    if tidx.size == 0:
        return f"{train.path} has no maps in split {opts.training_split!r}"
    return None


def run_memorization(
    opts: MemorizationOptions,
    ref: MapStore,
    ref_split: str,
    ref_idx: np.ndarray,
    cand: MapStore,
    cand_idx: np.ndarray,
    *,
    device: torch.device,
    show_progress: bool,
    warnings: list[str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the memorisation check if asked for and possible.

    The training maps are ``opts.training`` (default: the reference store) in ``opts.training_split``;
    at most ``opts.max_maps`` candidate and held-out maps are checked. Returns (the record for
    summary.json, with ``status`` done or skipped; the training store's record, or ``None``).
    """
    if opts.enabled is False:
        return {"status": "skipped", "pass": None, "note": "memorization.enabled=false"}, None
    same = opts.training is None or opts.training.resolve() == ref.path.resolve()
    train = ref if same else open_store(opts.training)
    if not same:
        check_compatible(ref, train, warnings, what="memorization.training")
    tidx = train.indices(opts.training_split)
    reason = _skip_reason(opts, same, train, tidx, ref_split)
    if reason is not None:
        if opts.enabled is True:
            raise ValueError(f"memorization: {reason}; set memorization.training / training_split")
        return {"status": "skipped", "pass": None, "note": f"skipped: {reason}"}, None
    ci, hi = cand_idx[: opts.max_maps], ref_idx[: opts.max_maps]
    if hi.size < 2:
        raise ValueError("memorization: needs at least 2 held-out reference maps")
    bar = progress(tidx.size, unit="map", desc="memorization", enabled=show_progress)

    def stream() -> Iterator[np.ndarray]:
        for maps in batches(train, tidx, opts.batch_size):
            bar.update(maps.shape[0])
            yield maps

    t0 = time.time()
    res = memorization_check(
        cand.read(ci),
        stream(),
        ref.read(hi),
        opts.tolerances,
        chunk=opts.batch_size,
        device=device,
        dihedral=opts.dihedral,
    )
    bar.close()
    res["status"] = "done"
    res["seconds"] = time.time() - t0
    res["training_path"] = str(train.path.resolve())
    res["training_split"] = opts.training_split
    res["n_training"] = int(tidx.size)
    res["candidate_nearest_training_index"] = tidx[res.pop("candidate_nearest_index")]
    return res, store_record(train, opts.training_split, tidx)
