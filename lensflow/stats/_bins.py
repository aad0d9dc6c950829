"""The histogram engine of the statistics: bin edges prepared for fast per-map histograms on one device.

:class:`Bins` serves peaks, minima and the PDF; :class:`MinkowskiBins` the three Minkowski functionals at
once.  The fused CPU kernels (:mod:`lensflow.stats._fused`) apply the same binning rule.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Bins", "MinkowskiBins", "midpoints"]


class Bins:
    """Bin edges prepared for fast per-map histograms on one device.

    Bin ``b`` holds ``edges[b] <= v < edges[b+1]``; with ``close_last`` (the :func:`numpy.histogram`
    rule) the last bin also holds ``v == edges[-1]``.  Uniform edges (the usual ``linspace``) are binned
    arithmetically, floor((v - e0) / width), which is several times faster than a binary search; values
    within a small fraction of a bin width from an edge are re-binned by exact comparison, so the result is the
    same as comparing with the edges themselves.
    """

    def __init__(self, edges: np.ndarray, device: torch.device, dtype: torch.dtype, close_last: bool = True):
        e = np.asarray(edges, dtype=np.float64)
        self.edges = e
        self.t = torch.as_tensor(e, dtype=dtype, device=device)
        self.nb = e.size - 1
        self.close_last = close_last
        width = (e[-1] - e[0]) / self.nb
        # Arithmetic binning is exact up to rounding of (v - e0) / width and of the edges themselves;
        # values closer than `near` (in bin widths) to an edge are re-binned exactly, so the margin
        # must exceed both roundings: require edges on the uniform grid to 1% of it and edges not
        # too far from zero in bin widths for the precision at hand.
        f64 = dtype == torch.float64
        self.near = 1e-6 if f64 else 1e-3
        off_grid = np.abs(e - (e[0] + width * np.arange(e.size))).max() / width
        self.uniform = bool(off_grid <= 0.01 * self.near and np.abs(e).max() / width < (1e7 if f64 else 1e3))
        self.e0, self.inv = float(e[0]), 1.0 / width

    def exact(self, v: torch.Tensor) -> torch.Tensor:
        """Bin of every value by comparison with the edges: -1 below, ``nbins`` above."""
        b = torch.bucketize(v.contiguous(), self.t, right=True) - 1
        if self.close_last:
            b.masked_fill_(v == self.t[-1], self.nb - 1)
        return b

    def index(self, v: torch.Tensor, map_index: torch.Tensor) -> torch.Tensor:
        """Flat slot of every value in a per-map table of ``nbins + 2`` slots (underflow, the bins,
        overflow): ``map * (nbins + 2) + bin + 1``.  ``map_index`` broadcasts against ``v`` (e.g.
        [N, 1, 1] for values [N, H, W]).  Out-of-range values land in the under/overflow slots instead
        of being masked, which saves passes over the data."""
        offset = map_index * (self.nb + 2) + 1
        if not self.uniform or v.numel() < 2048:
            return (self.exact(v) + offset).reshape(-1)
        t = (v - self.e0).mul_(self.inv)
        f = t.floor()
        near = t.sub_(f).sub_(0.5).abs_() > 0.5 - self.near  # fractional part close to 0 or 1
        flat = f.clamp_(-1, self.nb).to(torch.int64).add_(offset).reshape(-1)
        sel = near.reshape(-1).nonzero().squeeze(1)
        if sel.numel():
            shape = near.shape
            vv = v.expand(shape).reshape(-1)[sel]
            flat[sel] = self.exact(vv) + offset.expand(shape).reshape(-1)[sel]
        return flat

    def table(self, flat: torch.Tensor, n_maps: int, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """[N, nbins + 2] sums of ``weights`` (counts if None) over the slots from :meth:`index`."""
        size = n_maps * (self.nb + 2)
        if weights is None:
            return torch.bincount(flat, minlength=size).to(dtype).reshape(n_maps, self.nb + 2)
        # scatter_add_ sums in the same (index) order as bincount but skips bincount's min/max passes
        # over the indices and its cast of the weights to float64
        w = weights.reshape(-1).to(dtype)
        out = torch.zeros(size, dtype=dtype, device=flat.device)
        return out.scatter_add_(0, flat, w).reshape(n_maps, self.nb + 2)

    def histogram(
        self,
        values: torch.Tensor,
        weights: torch.Tensor | None = None,
        map_index: torch.Tensor | None = None,
        n_maps: int | None = None,
    ) -> torch.Tensor:
        """Per-map histogram ``[N, nbins]`` of ``values`` [N, ...] (or flat values with ``map_index``):
        sums of ``weights``, counts if None, in the dtype of ``values``; out-of-range values dropped."""
        if map_index is None:
            n_maps = int(values.shape[0])
            map_index = torch.arange(n_maps, device=values.device).reshape(-1, *([1] * (values.ndim - 1)))
        assert n_maps is not None
        flat = self.index(values, map_index)
        return self.table(flat, n_maps, weights, values.dtype)[:, 1:-1]


def midpoints(edges: np.ndarray) -> np.ndarray:
    return 0.5 * (edges[:-1] + edges[1:])


class MinkowskiBins:
    """Thresholds t_0 < ... < t_n prepared for :func:`minkowski_tensor`.

    One binning serves all three functionals: the merged edges t_0 < m_0 < t_1 < ... < t_n interleave
    thresholds and bin midpoints m_b, so pairs of merged bins are the δ bins [t_b, t_b+1) of V1 and V2,
    and counts above m_b (plus those >= t_n) give V0.
    """

    def __init__(self, thresholds: np.ndarray, device: torch.device, dtype: torch.dtype) -> None:
        t = np.asarray(thresholds, dtype=np.float64)
        merged = np.empty(2 * t.size - 1)
        merged[0::2] = t
        merged[1::2] = 0.5 * (t[1:] + t[:-1])
        self.nb = t.size - 1
        self.merged = Bins(merged, device, dtype, close_last=False)
        self.width = torch.as_tensor(np.diff(t), dtype=dtype, device=device)
