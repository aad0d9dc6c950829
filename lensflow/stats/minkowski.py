"""Minkowski functionals V0, V1, V2 of the excursion sets of κ maps."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._array import ArrayLike, check_border, chunks, crop, edges_array, finish, positive, prepare_maps
from ._bins import MinkowskiBins


def derivatives(x: torch.Tensor, periodic: bool, border: int) -> tuple[torch.Tensor, ...]:
    """Centre value, gradient and Hessian of [N, H, W] maps by second-order central differences.

    Returned in pixel units and scaled for speed: ``(k, a, b, kxx, kyy, cxy)`` with a = 2κx, b = 2κy,
    cxy = 4κxy (x along columns, y along rows), each [N, H', W'].  Without ``periodic`` the outer
    ``max(border, 1)`` pixels are dropped (the stencils need a neighbour on every side); with it
    neighbours wrap around and ``border`` pixels are cut.
    """
    if periodic:
        x = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="circular").squeeze(1)
        cut = border
    else:
        cut = max(border, 1) - 1
    x = crop(x, cut)
    c = x[..., 1:-1, 1:-1]
    right, left = x[..., 1:-1, 2:], x[..., 1:-1, :-2]
    up, down = x[..., 2:, 1:-1], x[..., :-2, 1:-1]
    a = right - left
    b = up - down
    kxx = torch.add(right, left).sub_(c, alpha=2.0)
    kyy = torch.add(up, down).sub_(c, alpha=2.0)
    cxy = torch.sub(x[..., 2:, 2:], x[..., 2:, :-2]).sub_(x[..., :-2, 2:]).add_(x[..., :-2, :-2])
    return c, a, b, kxx, kyy, cxy


def minkowski_tensor(
    x: torch.Tensor, bins: MinkowskiBins, pixel_arcmin: float, periodic: bool, border: int
) -> torch.Tensor:
    """[N, 3, nbins] Minkowski functionals of [N, H, W] maps (internal, no validation)."""
    n = x.shape[0]
    c, a, b, kxx, kyy, cxy = derivatives(x, periodic, border)
    a2 = a * a
    b2 = b * b
    g2 = a2 + b2  # 4 |∇κ|²
    grad = torch.sqrt(g2)  # 2 |∇κ|
    # curvature of the level line times |∇κ|: (2κxκyκxy - κx²κyy - κy²κxx) / |∇κ|²
    #   = (a b cxy / 2 - a² κyy - b² κxx) / (a² + b²); computed doubled, a b cxy - 2a² κyy - 2b² κxx
    # (exact powers of two, halved in v2 below), with fused multiply-adds: every pass over the
    # pixels counts.  The numerator vanishes with the gradient, so clamping the denominator sets the
    # (measure-zero) critical points to 0 without a branch
    num = torch.mul(a, b).mul_(cxy).addcmul_(a2, kyy, value=-2.0).addcmul_(b2, kxx, value=-2.0)
    curv = num.div_(g2.clamp_(min=torch.finfo(g2.dtype).tiny))
    idx = bins.merged.index(c, torch.arange(n, device=x.device).view(n, 1, 1))
    count = bins.merged.table(idx, n, None, x.dtype)
    s_grad = bins.merged.table(idx, n, grad, x.dtype)
    s_curv = bins.merged.table(idx, n, curv, x.dtype)
    return minkowski_from_tables(count, s_grad, s_curv, bins, c.shape[-1] * c.shape[-2], pixel_arcmin)


def minkowski_from_tables(
    count: torch.Tensor,
    s_grad: torch.Tensor,
    s_curv: torch.Tensor,
    bins: MinkowskiBins,
    npix_region: int,
    pixel_arcmin: float,
) -> torch.Tensor:
    """[N, 3, nbins] V0–V2 from per-map tables over the merged slots (underflow, 2·nbins - 1... bins,
    overflow): pixel counts, sums of 2|∇κ| and sums of twice the curvature term (pixel units)."""
    nm = 2 * bins.nb
    s_grad = s_grad[:, 1 : nm + 1]
    s_curv = s_curv[:, 1 : nm + 1]
    # pixels >= m_b: merged bins 2b+1 ... 2nb-1 plus the overflow slot (>= t_n)
    tail = count.flip(1).cumsum(1).flip(1)
    v0 = tail[:, 2:-1:2] / npix_region
    pair_grad = s_grad[:, 0::2] + s_grad[:, 1::2]  # both halves of [t_b, t_b+1)
    pair_curv = s_curv[:, 0::2] + s_curv[:, 1::2]
    # undo the scalings: grad = 2|∇κ|, curv twice the curvature term; 1/pixel per derivative order
    v1 = pair_grad / (8.0 * npix_region * pixel_arcmin * bins.width)
    v2 = pair_curv / (4.0 * math.pi * npix_region * pixel_arcmin**2 * bins.width)
    return torch.stack([v0, v1, v2], dim=1)


def minkowski(
    maps: ArrayLike, thresholds: Any, pixel_arcmin: float, periodic: bool = False, border: int = 0
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Minkowski functionals of the excursion sets {κ >= ν}: area, boundary length, Euler characteristic.

    ``thresholds`` are bin edges t_0 < ... < t_n in map units; each functional is returned per bin and
    belongs to the bin midpoint ν_b = (t_b + t_{b+1}) / 2:

    * V0(ν_b) = fraction of pixels with κ >= ν_b (exact at the midpoint);
    * V1(ν_b) = (1/4A) ∫ δ(κ-ν) |∇κ| dA, per arcmin;
    * V2(ν_b) = (1/2πA) ∫ δ(κ-ν) (2κxκyκxy - κx²κyy - κy²κxx) / (κx² + κy²) dA, per arcmin²;

    where δ(κ-ν) is the indicator of t_b <= κ < t_{b+1} divided by the bin width (the estimator of
    Kratochvil et al. 2012 / LensTools), so V1 and V2 are bin averages.  Derivatives are second-order
    central differences converted to arcmin with ``pixel_arcmin``, so maps of different resolution are
    comparable.  A is the area of the pixels used: without ``periodic`` the outer pixel ring is left
    out (no stencil there), and ``border`` widens the excluded ring.

    Returns ``(v0, v1, v2)``, each [nbins], [B, nbins] or [B, C, nbins].
    """
    batch = prepare_maps(maps, "maps", min_size=3)
    t = edges_array(thresholds, "thresholds")
    pix = positive(pixel_arcmin, "pixel_arcmin")
    b = check_border(border, batch.npix, bool(periodic))
    x = batch.data
    bins = MinkowskiBins(t, x.device, x.dtype)
    out = torch.empty(batch.n, 3, t.size - 1, dtype=x.dtype, device=x.device)
    for sl in chunks(batch.n, batch.npix * batch.npix, x.device):
        out[sl] = minkowski_tensor(x[sl], bins, pix, bool(periodic), b)
    return finish(batch, out[:, 0]), finish(batch, out[:, 1]), finish(batch, out[:, 2])


__all__ = ["minkowski"]
