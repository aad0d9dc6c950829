"""One-point statistics of κ maps: pixel PDF and moments."""

from __future__ import annotations

from typing import Any

import torch

from ._array import ArrayLike, check_border, chunks, crop, edges_array, finish, prepare_maps
from ._bins import Bins


def pixel_pdf(maps: ArrayLike, edges: Any, border: int = 0) -> ArrayLike:
    """Histogram of pixel values as a probability density, per map.

    density_b = count_b / (N_pixels · (e_{b+1} - e_b)) with N_pixels all pixels of the map (outside
    ``border``), including those outside the edges: the result estimates p(κ) on the bins and integrates
    to the fraction of pixels inside the edges.  Bins follow :func:`numpy.histogram`.
    """
    batch = prepare_maps(maps, "maps", min_size=1)
    e = edges_array(edges, "edges")
    b = check_border(border, batch.npix, periodic=True)  # the PDF needs no neighbours: no ring is lost
    x = batch.data
    bins = Bins(e, x.device, x.dtype)
    out = torch.empty(batch.n, e.size - 1, dtype=x.dtype, device=x.device)
    for sl in chunks(batch.n, batch.npix * batch.npix, x.device):
        out[sl] = pdf_tensor(crop(x[sl], b), bins)
    return finish(batch, out)


def pdf_tensor(x: torch.Tensor, bins: Bins) -> torch.Tensor:
    """[N, nbins] pixel PDF of [N, H, W] maps (internal, no validation)."""
    counts = bins.histogram(x)
    npix = x.shape[-1] * x.shape[-2]
    return counts / (npix * (bins.t[1:] - bins.t[:-1]))


def moments_tensor(x: torch.Tensor) -> torch.Tensor:
    v = x.reshape(x.shape[0], -1)
    mean = v.mean(dim=1, keepdim=True)
    d = v - mean
    d2 = d * d
    m2 = d2.mean(dim=1)
    m3 = (d2 * d).mean(dim=1)
    m4 = (d2 * d2).mean(dim=1)
    return moments_from_central(mean[:, 0], m2, m3, m4)


def moments_from_central(mean: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor, m4: torch.Tensor) -> torch.Tensor:
    """[N, 4] (mean, variance, skewness, excess kurtosis) from the mean and central moments m2–m4."""
    # a constant map has no defined skewness or kurtosis: report 0 rather than nan
    safe = torch.where(m2 > 0, m2, torch.ones_like(m2))
    skew = torch.where(m2 > 0, m3 / safe**1.5, torch.zeros_like(m2))
    kurt = torch.where(m2 > 0, m4 / safe**2 - 3.0, torch.zeros_like(m2))
    return torch.stack([mean, m2, skew, kurt], dim=1)


def moments(maps: ArrayLike, border: int = 0) -> ArrayLike:
    """Mean, variance, skewness and excess kurtosis of the pixel values of each map.

    Population (biased, ddof=0) estimators, as :func:`scipy.stats.skew` and :func:`scipy.stats.kurtosis`
    with their defaults: var = m2, skew = m3 / m2^1.5, kurt = m4 / m2² - 3 (m_k central moments).
    Returns [4], [B, 4] or [B, C, 4]; a constant map has skewness and kurtosis 0.
    """
    batch = prepare_maps(maps, "maps", min_size=1)
    b = check_border(border, batch.npix, periodic=True)  # the PDF needs no neighbours: no ring is lost
    x = batch.data
    out = torch.empty(batch.n, 4, dtype=x.dtype, device=x.device)
    for sl in chunks(batch.n, batch.npix * batch.npix, x.device):
        out[sl] = moments_tensor(crop(x[sl], b))
    return finish(batch, out)


__all__ = ["moments", "pixel_pdf"]
