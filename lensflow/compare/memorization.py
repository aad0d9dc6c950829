"""Pixel-level memorisation: nearest-neighbour distances to the training maps, and the verdict on them.

:func:`memorization_check` compares the distances of candidate maps with those of held-out maps that
the emulator never saw (the reasoning is in the package docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

from lensflow.compare.tolerances import MemorizationTolerances

__all__ = ["memorization_check", "nearest_neighbour_distances"]

Maps = np.ndarray | torch.Tensor


def _tensor(x: Maps, what: str) -> torch.Tensor:
    """``x`` as a tensor of maps [N, ...] (numpy arrays are shared, not copied)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim < 2:
        raise ValueError(f"{what} must be a batch of maps [N, ...], got shape {tuple(t.shape)}")
    return t


def _dihedral_rows(qt: torch.Tensor) -> torch.Tensor:
    """The 8 rotations/flips of square maps [N, ..., H, W], stacked variant-major as rows [8N, F]."""
    if qt.ndim < 3 or qt.shape[-1] != qt.shape[-2]:
        raise ValueError("dihedral matching needs square maps [N, ..., H, W]")
    variants = [qt, qt.flip(-1)]
    for k in (1, 2, 3):
        rot = torch.rot90(qt, k, dims=(-2, -1))
        variants += [rot, rot.flip(-1)]
    return torch.cat([v.reshape(v.shape[0], -1) for v in variants])


def nearest_neighbour_distances(
    queries: Maps,
    references: Maps | Iterable[Maps],
    *,
    chunk: int = 256,
    device: str | torch.device | None = None,
    dihedral: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance (in κ units, over all pixels and channels) of each query map to its nearest reference map.

    Args:
        queries: maps [Nq, ...] held in memory.
        references: maps [Nr, ...], or an iterable of such batches (streamed once; memory stays
            O(chunk × Nq)), e.g. batches read from a training store.
        chunk: rows per ``torch.cdist`` block.
        device: where to compute (default: CPU).
        dihedral: also match the 8 rotations/flips of each query (square maps [.., H, W]), so a flipped
            copy of a training map counts as a copy.

    Returns:
        (distance [Nq] float64, index [Nq] int64 of the nearest reference in streaming order).

    Distances are computed in float64 with the matrix-product form of ``cdist``: float32 would leave
    an exact copy at a rounding-noise distance of ~1e-3 of the map norm instead of ~1e-8.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    qt = _tensor(queries, "queries")
    q_all = _dihedral_rows(qt) if dihedral else qt.reshape(qt.shape[0], -1)
    nq = qt.shape[0]
    n_var = q_all.shape[0] // max(nq, 1)
    q_all = q_all.to(dev, torch.float64)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    best = torch.full((q_all.shape[0],), math.inf, dtype=torch.float64, device=dev)
    best_idx = torch.full((q_all.shape[0],), -1, dtype=torch.int64, device=dev)
    batches: Iterable[Any] = [references] if isinstance(references, (np.ndarray, torch.Tensor)) else references
    offset = 0
    for batch in batches:
        rb = _tensor(batch, "references")
        rb = rb.reshape(rb.shape[0], -1)
        if rb.shape[1] != q_all.shape[1]:
            raise ValueError(f"reference maps have {rb.shape[1]} values each, queries {q_all.shape[1]}")
        for lo in range(0, rb.shape[0], chunk):
            rc = rb[lo : lo + chunk].to(dev, torch.float64)
            for qlo in range(0, q_all.shape[0], chunk):
                qc = q_all[qlo : qlo + chunk]
                dmin, imin = torch.cdist(qc, rc, compute_mode="use_mm_for_euclid_dist").min(dim=1)
                sl = slice(qlo, qlo + qc.shape[0])
                upd = dmin < best[sl]
                best[sl] = torch.where(upd, dmin, best[sl])
                best_idx[sl] = torch.where(upd, imin + offset + lo, best_idx[sl])
        offset += rb.shape[0]
    if offset == 0:
        raise ValueError("references hold no maps")
    best = best.reshape(n_var, nq)
    best_idx = best_idx.reshape(n_var, nq)
    which = best.argmin(dim=0)
    d = best.gather(0, which[None]).squeeze(0)
    i = best_idx.gather(0, which[None]).squeeze(0)
    return d.cpu().numpy(), i.cpu().numpy()


def memorization_check(
    candidate: Maps,
    training: Maps | Iterable[Maps],
    heldout: Maps,
    tolerances: MemorizationTolerances | Mapping[str, Any] | None = None,
    *,
    chunk: int = 256,
    device: str | torch.device | None = None,
    dihedral: bool = False,
) -> dict[str, Any]:
    """Pixel-level memorisation check: are candidate maps closer to the training maps than held-out maps?

    Args:
        candidate: candidate maps [N_c, ...] (e.g. mocks).
        training: the maps the emulator was trained on [N_t, ...], or an iterable of batches (streamed
            once, so a generator reading a store batch by batch keeps memory constant).
        heldout: reference maps the emulator never saw [N_h, ...], same pixel layout.
        tolerances: :class:`MemorizationTolerances` or a mapping of its fields.
        chunk, device, dihedral: as in :func:`nearest_neighbour_distances`.

    Returns a dict with the distances (κ units), their medians, ``near_threshold``, the near-copy
    fractions of both sets, the one-sided Mann–Whitney U p-value (candidates closer), ``median_ratio``,
    the index of each candidate's nearest training map, ``pass`` and ``failures``.
    """
    tol = MemorizationTolerances.from_config(tolerances)
    ct, ht = _tensor(candidate, "candidate"), _tensor(heldout, "heldout")
    if ct.shape[1:] != ht.shape[1:]:
        raise ValueError(
            f"candidate maps {tuple(ct.shape[1:])} and held-out maps {tuple(ht.shape[1:])} differ in shape"
        )
    if ct.shape[0] < 1 or ht.shape[0] < 2:
        raise ValueError(
            f"memorization check needs >= 1 candidate and >= 2 held-out maps, got {ct.shape[0]} and {ht.shape[0]}"
        )
    # One query set, so the training maps are streamed once.
    d, idx = nearest_neighbour_distances(
        torch.cat([ct.to(torch.float64), ht.to(torch.float64)]), training, chunk=chunk, device=device, dihedral=dihedral
    )
    nc = ct.shape[0]
    dc = np.asarray(d[:nc], dtype=np.float64)
    dh = np.asarray(d[nc:], dtype=np.float64)
    med_h = float(np.median(dh))
    med_c = float(np.median(dc))
    thr = tol.near_factor * med_h
    frac_c = float(np.mean(dc < thr))
    frac_h = float(np.mean(dh < thr))
    if np.all(dc == dc[0]) and np.all(dh == dc[0]):
        p_mw = 1.0
    else:
        p_mw = float(sps.mannwhitneyu(dc, dh, alternative="less").pvalue)
    ratio = med_c / med_h if med_h > 0 else (1.0 if med_c == 0 else math.inf)
    failures = []
    if frac_c > tol.max_near_fraction:
        failures.append(
            f"memorization: {frac_c:.1%} of candidate maps lie within {tol.near_factor} x the median "
            f"held-out distance of a training map (allowed {tol.max_near_fraction:.1%}; held-out "
            f"maps: {frac_h:.1%})"
        )
    if p_mw < tol.pvalue and ratio < tol.median_ratio:
        failures.append(
            f"memorization: candidates are closer to the training maps than held-out maps "
            f"(median ratio {ratio:.2f} < {tol.median_ratio}, Mann-Whitney p = {p_mw:.1e})"
        )
    return {
        "candidate_distances": dc,
        "heldout_distances": dh,
        "median_candidate": med_c,
        "median_heldout": med_h,
        "median_ratio": ratio,
        "near_threshold": thr,
        "near_fraction_candidate": frac_c,
        "near_fraction_heldout": frac_h,
        "mannwhitney_pvalue": p_mw,
        "n_candidate": int(dc.size),
        "n_heldout": int(dh.size),
        "tolerances": asdict(tol),
        "dihedral": bool(dihedral),
        "candidate_nearest_index": idx[:nc],
        "pass": not failures,
        "failures": failures,
    }
