"""Peak (local maximum) and minimum counts of κ maps."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._array import ArrayLike, check_border, chunks, crop, edges_array, finish, prepare_maps
from ._bins import Bins


def extrema_mask(x: torch.Tensor, periodic: bool, border: int, minima: bool = False) -> torch.Tensor:
    """Strict 8-neighbour maxima (or minima) of [N, H, W] maps, returned with the candidate pixels.

    Returns ``(center, mask)`` of equal shape: the candidate pixel values and whether each is strictly
    above (below) all 8 neighbours.  Without ``periodic`` the outer ``max(border, 1)`` pixels are not
    candidates (they lack neighbours); with it neighbours wrap around and only ``border`` is cut.
    """
    if periodic:
        x = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="circular").squeeze(1)
        cut = border
    else:
        cut = max(border, 1) - 1
    ext = torch.minimum if minima else torch.maximum
    # neighbour extreme, separably: 3-wide row extremes give the rows above and below, the centre row
    # needs only its left and right pixels
    row3 = ext(ext(x[..., :, :-2], x[..., :, 1:-1]), x[..., :, 2:])
    neigh = ext(ext(row3[..., :-2, :], row3[..., 2:, :]), ext(x[..., 1:-1, :-2], x[..., 1:-1, 2:]))
    center = x[..., 1:-1, 1:-1]
    mask = center < neigh if minima else center > neigh
    return crop(center, cut), crop(mask, cut)


def extrema_counts(x: torch.Tensor, bins: Bins, periodic: bool, border: int, minima: bool) -> torch.Tensor:
    """[N, nbins] peak (or minimum) counts of [N, H, W] maps (internal, no validation)."""
    n = x.shape[0]
    center, mask = extrema_mask(x, periodic, border, minima)
    # integer indices of the (few) extrema are cheaper than boolean-mask selection
    flat = mask.reshape(-1).nonzero().squeeze(1)
    h, w = center.shape[-2:]
    map_index = flat // (h * w)
    rest = flat % (h * w)
    values = center[map_index, rest // w, rest % w]
    return bins.histogram(values, map_index=map_index, n_maps=n)


def _counts(maps: Any, edges: Any, periodic: bool, border: int, minima: bool) -> ArrayLike:
    batch = prepare_maps(maps, "maps", min_size=3)
    e = edges_array(edges, "edges")
    b = check_border(border, batch.npix, bool(periodic))
    x = batch.data
    bins = Bins(e, x.device, x.dtype)
    out = torch.empty(batch.n, e.size - 1, dtype=x.dtype, device=x.device)
    for sl in chunks(batch.n, batch.npix * batch.npix, x.device):
        out[sl] = extrema_counts(x[sl], bins, bool(periodic), b, minima)
    return finish(batch, out)


def peak_counts(maps: ArrayLike, edges: Any, periodic: bool = False, border: int = 0) -> ArrayLike:
    """Raw number of peaks per map in each height bin.

    A peak is a pixel strictly higher than all 8 neighbours (plateaus do not count).  Heights are in map
    units: for signal-to-noise bins pass ν edges times σ_noise.  Bins follow :func:`numpy.histogram`
    ([lo, hi), last bin closed); peaks outside the edges are not counted.  Without ``periodic`` the
    outermost pixel ring cannot hold a peak; ``border`` excludes a wider ring (in pixels), e.g. the band
    affected by zero-padded smoothing.

    Returns [nbins], [B, nbins] or [B, C, nbins] counts (floating point, so that means and
    covariances need no cast).
    """
    return _counts(maps, edges, periodic, border, minima=False)


def minima_counts(maps: ArrayLike, edges: Any, periodic: bool = False, border: int = 0) -> ArrayLike:
    """Raw number of local minima (strictly below all 8 neighbours) per map and height bin; see
    :func:`peak_counts`."""
    return _counts(maps, edges, periodic, border, minima=True)


__all__ = ["minima_counts", "peak_counts"]
