"""The CPU driver of the fused numba kernels behind :func:`lensflow.stats.summarize` (``backend="fused"``).

Three steps: :func:`_plan` allocates the output tables, :func:`_run_blocks` hands blocks of a few maps to a pool
of ``torch.get_num_threads()`` threads (each draws its maps' noise from their per-map streams and runs the FFT
and the kernels of :mod:`lensflow.stats._fused` while the maps are in cache), and :func:`_assemble` turns the
tables into the outputs of the torch reference path, with which tests require equal counts and floats equal
to round-off.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensflow._util.units import ARCMIN

from ._array import ArrayLike, Batch, to_output
from ._bins import Bins
from ._streams import NoiseStreams, kernels
from .config import SummaryConfig
from .minkowski import minkowski_from_tables
from .pdf import moments_from_central
from .smoothing import TRUNCATE, gaussian_weights
from .spectra import mode_coef

__all__ = ["FUSED_BLOCK_PIXELS", "summarize_fused", "use_fused"]

#: Pixels per block of maps handed to one thread (4 maps of 128x128: measured 4 and 8 equal within noise,
#: 16 a little slower).
FUSED_BLOCK_PIXELS = 1 << 16


def use_fused(backend: str, dev: torch.device, npix: int, sig_pix: Sequence[float]) -> bool:
    """Whether :func:`summarize` takes the fused path: ``backend`` auto or fused, CPU maps, numba, and every
    smoothing kernel narrower than the map (``backend="fused"`` raises when one of these fails)."""
    if backend not in ("auto", "torch", "fused"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'fused', got {backend!r}")
    why = None
    if dev.type != "cpu":
        why = f"maps on {dev.type}"
    elif not kernels().AVAILABLE:
        why = "numba is not importable"
    elif any(int(TRUNCATE * s + 0.5) >= npix for s in sig_pix):
        why = f"a smoothing kernel as wide as the {npix}x{npix} maps"
    if backend == "fused" and why is not None:
        raise ValueError(f"backend: 'fused' needs CPU maps, numba and kernels narrower than the map; got {why}")
    return backend != "torch" and why is None


def _bin_arrays(b: Bins | None) -> tuple[np.ndarray, np.ndarray]:
    if b is None:  # statistic not requested: the kernel needs arrays of the right type only
        return np.zeros(2), np.zeros(4)
    return b.edges, kernels().bin_spec(b.uniform, b.e0, b.inv, b.near)


@dataclass
class _Plan:
    """Inputs and output tables of one fused summary (``dummy`` stands in for statistics not requested)."""

    x: np.ndarray  # [B, C, H, W] float64 maps
    noise: NoiseStreams | None
    periodic: bool
    border: int
    flags: np.ndarray  # peaks, minima, pdf, minkowski, moments requested (0/1)
    dummy: np.ndarray
    cl: dict[str, np.ndarray] | None  # slot, coef, pa, pb and the output "out" [B, pairs, n_ell]
    per_scale: list[dict[str, Any]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.x.shape[0]), int(self.x.shape[1]), int(self.x.shape[-1])

    def rows(self, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The rows of maps ``lo:hi`` (all their channels) of a per-map-and-channel table."""
        nchan = self.x.shape[1]
        return a if a is self.dummy else a[lo * nchan : hi * nchan]


def _plan(
    cfg: SummaryConfig,
    x_all: torch.Tensor,
    noise: NoiseStreams | None,
    ell_info: dict[str, np.ndarray] | None,
    bins: dict[str, Any],
    labels: list[str],
    sig_pix: list[float],
    border: int,
) -> _Plan:
    """Kernel arguments and empty output tables for every requested statistic."""
    stats = cfg.statistics
    nmaps, nchan, npix = int(x_all.shape[0]), int(x_all.shape[1]), int(x_all.shape[-1])
    x_np = np.ascontiguousarray(x_all.numpy())
    nflat = nmaps * nchan
    flags = np.array([s in stats for s in ("peaks", "minima", "pdf", "minkowski", "moments")], dtype=np.int64)
    dummy = np.zeros((1, 1))

    cl = None
    if ell_info is not None:
        n_ell = ell_info["n_modes"].size
        if nchan > 1 and cfg.cross:
            pa, pb = (np.ascontiguousarray(a, dtype=np.int64) for a in np.triu_indices(nchan))
        else:
            pa = pb = np.arange(nchan, dtype=np.int64)
        cl = {
            "slot": ell_info["bin"].astype(np.int64),
            "coef": mode_coef(ell_info, (cfg.pixel_arcmin * ARCMIN) ** 2 / npix**2),
            "pa": pa,
            "pb": pb,
            "out": np.empty((nmaps, pa.size, n_ell)),
        }

    per_scale = []
    for lab, s in zip(labels, sig_pix, strict=True):
        pk = bins.get(f"peaks@{lab}")
        mn = bins.get(f"minima@{lab}")
        pdf = bins.get(f"pdf@{lab}")
        mk = bins.get(f"v0@{lab}")
        nm2 = 2 * mk.nb + 1 if mk is not None else 0  # merged slots incl. under/overflow
        per_scale.append(
            {
                "w": gaussian_weights(s) if s > 0 else np.ones(1),
                "pk": _bin_arrays(pk),
                "mn": _bin_arrays(mn),
                "pdf": _bin_arrays(pdf),
                "mk": _bin_arrays(mk.merged if mk is not None else None),
                "out_pk": np.empty((nflat, pk.nb)) if pk is not None else dummy,
                "out_mn": np.empty((nflat, mn.nb)) if mn is not None else dummy,
                "out_pdf": np.empty((nflat, pdf.nb)) if pdf is not None else dummy,
                "out_cnt": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_grad": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_curv": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_mom": np.empty((nflat, 4)) if "moments" in stats else dummy,
            }
        )
    return _Plan(x_np, noise, bool(cfg.periodic), border, flags, dummy, cl, per_scale)


def _block(plan: _Plan, lo: int, hi: int, pre: np.ndarray | None) -> None:
    """Noise, C_ℓ and every smoothing scale of maps ``lo:hi`` (``pre``: their noise, drawn already)."""
    import scipy.fft

    _fused = kernels()
    _, nchan, npix = plan.shape
    xb = plan.x[lo:hi]
    noise = plan.noise
    if noise is None:
        y = xb
    else:
        if pre is None:
            y = np.empty_like(xb)
            noise.fill(y, lo)
        else:
            y = pre
        _fused.add_scaled(xb, y, noise.sigma, y)
    if plan.cl is not None:
        cl = plan.cl
        f = scipy.fft.rfft2(y, workers=1).reshape(hi - lo, nchan, -1)
        _fused.bin_spectra(f, cl["slot"], cl["coef"], cl["pa"], cl["pb"], cl["out"][lo:hi])
    flat = y.reshape(-1, npix, npix)
    for p in plan.per_scale:
        _fused.scale_stats(
            flat, p["w"], plan.periodic, plan.border, plan.flags, *p["pk"], *p["mn"], *p["pdf"], *p["mk"],
            plan.rows(p["out_pk"], lo, hi), plan.rows(p["out_mn"], lo, hi), plan.rows(p["out_pdf"], lo, hi),
            plan.rows(p["out_cnt"], lo, hi), plan.rows(p["out_grad"], lo, hi), plan.rows(p["out_curv"], lo, hi),
            plan.rows(p["out_mom"], lo, hi),
        )  # fmt: skip


def _run_blocks(plan: _Plan) -> None:
    """Fill the plan's tables, blocks of maps in parallel threads (per-map noise streams keep the result
    independent of blocks and threads; a sequential numpy generator is drawn per chunk, in map order)."""
    nmaps, nchan, npix = plan.shape
    noise = plan.noise
    threads = max(1, torch.get_num_threads())
    # a block of a few maps stays in L2 across every pass; many more blocks than threads balance load
    block = max(1, min(FUSED_BLOCK_PIXELS // (nchan * npix * npix), -(-nmaps // threads)))
    chunk = max(block * threads * 8, 1)  # maps whose sequential noise is drawn at once (memory bound)
    pool = ThreadPoolExecutor(threads) if threads > 1 and nmaps > block else None
    try:
        for c0 in range(0, nmaps, chunk):
            c1 = min(nmaps, c0 + chunk)
            pre = None
            if noise is not None and not noise.per_map:
                pre = noise.draw_numpy((nchan, npix, npix), c1 - c0)
            jobs = [(lo, min(c1, lo + block)) for lo in range(c0, c1, block)]
            args = [(lo, hi, None if pre is None else pre[lo - c0 : hi - c0]) for lo, hi in jobs]
            if pool is None:
                for a in args:
                    _block(plan, *a)
            else:
                for fut in [pool.submit(_block, plan, *a) for a in args]:
                    fut.result()
    finally:
        if pool is not None:
            pool.shutdown()


def _assemble(
    cfg: SummaryConfig, batch: Batch, plan: _Plan, bins: dict[str, Any], labels: list[str]
) -> dict[str, ArrayLike]:
    """The summary outputs (keys and units of the torch path) from the filled tables."""
    stats = cfg.statistics
    nmaps, nchan, npix = plan.shape
    border = plan.border
    b0 = border if plan.periodic else max(border, 1)
    out: dict[str, ArrayLike] = {}

    def put(key: str, value: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(value)
        out[key] = to_output(t.reshape(nmaps, -1), batch)

    if plan.cl is not None:
        put("cl", plan.cl["out"])
    region = (npix - 2 * b0) ** 2
    full = (npix - 2 * border) ** 2
    for lab, p in zip(labels, plan.per_scale, strict=True):
        if "peaks" in stats:
            put(f"peaks@{lab}", p["out_pk"])
        if "minima" in stats:
            put(f"minima@{lab}", p["out_mn"])
        if "pdf" in stats:
            width = np.diff(bins[f"pdf@{lab}"].edges)
            put(f"pdf@{lab}", p["out_pdf"] / (full * width))
        if "minkowski" in stats:
            t = [torch.from_numpy(p[k]) for k in ("out_cnt", "out_grad", "out_curv")]
            v = minkowski_from_tables(*t, bins[f"v0@{lab}"], region, cfg.pixel_arcmin)
            v = v.reshape(nmaps, nchan, 3, -1)
            for j, key in enumerate(("v0", "v1", "v2")):
                put(f"{key}@{lab}", v[:, :, j])
        if "moments" in stats:
            m = torch.from_numpy(p["out_mom"])
            put(f"moments@{lab}", moments_from_central(m[:, 0], m[:, 1], m[:, 2], m[:, 3]))
    return out


def summarize_fused(
    cfg: SummaryConfig,
    batch: Batch,
    x_all: torch.Tensor,
    noise: NoiseStreams | None,
    ell_info: dict[str, np.ndarray] | None,
    bins: dict[str, Any],
    labels: list[str],
    sig_pix: list[float],
    border: int,
) -> dict[str, ArrayLike]:
    """:func:`lensflow.stats.summarize` on CPU maps ``x_all`` [B, C, H, W] through the fused kernels."""
    plan = _plan(cfg, x_all, noise, ell_info, bins, labels, sig_pix, border)
    _run_blocks(plan)
    return _assemble(cfg, batch, plan, bins, labels)
