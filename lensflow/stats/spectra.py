"""Flat-sky angular power spectra of square κ maps (LensTools normalization)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from lensflow._util.units import ARCMIN

from ._array import ArrayLike, chunks, edges_array, positive, prepare_maps, to_output

# A mode whose ℓ lies within this relative distance of a bin edge counts as lying on it, so that the
# (ℓ_lo, ℓ_hi] assignment of lattice modes that sit exactly on an edge (common with log-spaced edges
# over powers of two) does not depend on floating-point rounding.
_EDGE_RTOL = 1e-9


def _mode_ell(npix: int, pixel_arcmin: float) -> tuple[np.ndarray, np.ndarray]:
    """ℓ of every rfft2 mode of an npix x npix map and its multiplicity in the full Fourier plane.

    ℓ = 2π |k| with k from ``fftfreq(npix, d=pixel size in radians)``.  Columns 0 < kx < Nyquist stand
    for two full-plane modes (k and its conjugate -k), the kx = 0 and kx = Nyquist columns for one.
    """
    d = pixel_arcmin * ARCMIN
    ky = np.fft.fftfreq(npix, d=d)
    kx = np.fft.rfftfreq(npix, d=d)
    ell = 2.0 * np.pi * np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    weight = np.full(kx.shape, 2.0)
    weight[0] = 1.0
    if npix % 2 == 0:
        weight[-1] = 1.0
    return ell, np.broadcast_to(weight, ell.shape)


@functools.lru_cache(maxsize=32)
def mode_binning(npix: int, pixel_arcmin: float, edges: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Bin of every rfft2 mode (-1 outside), its full-plane weight, modes per bin and mode-weighted mean ℓ."""
    ell, weight = _mode_ell(npix, pixel_arcmin)
    e = np.asarray(edges)
    nb = e.size - 1
    # right=False: edges[i-1] < ℓ <= edges[i]  ->  bins (ℓ_lo, ℓ_hi]
    b = np.searchsorted(e, ell.ravel() * (1.0 - _EDGE_RTOL), side="left") - 1
    b[(b < 0) | (b >= nb)] = -1
    w = weight.ravel()
    valid = b >= 0
    n_modes = np.bincount(b[valid], weights=w[valid], minlength=nb)
    ell_sum = np.bincount(b[valid], weights=(w * ell.ravel())[valid], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        ell_mean = ell_sum / n_modes
    return {"bin": b, "weight": w, "n_modes": n_modes, "ell_mean": ell_mean}


def ell_modes(npix: int, pixel_arcmin: float, ell_edges: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mode-weighted mean ℓ of each bin and the number of full-plane Fourier modes in it.

    Useful for the Gaussian error of a bandpower, σ(C_ℓ) = C_ℓ sqrt(2 / n_modes).  Empty bins get
    ``ell = nan`` and ``n_modes = 0``.
    """
    npix = _npix(npix)
    pix = positive(pixel_arcmin, "pixel_arcmin")
    e = edges_array(ell_edges, "ell_edges")
    info = mode_binning(npix, pix, tuple(e.tolist()))
    return info["ell_mean"].copy(), info["n_modes"].copy()


def _npix(npix: Any) -> int:
    if isinstance(npix, bool) or not isinstance(npix, (int, np.integer)) or npix < 2:
        raise ValueError(f"npix: expected an integer >= 2, got {npix!r}")
    return int(npix)


def default_ell_edges(npix: int, pixel_arcmin: float, nbins: int = 20) -> np.ndarray:
    """Log-spaced ℓ edges from 2 ℓ_min to ℓ_Nyquist for an npix x npix map of pixel_arcmin pixels.

    ℓ_min = 2π / L is the fundamental mode of the field of side L (radians), ℓ_Nyquist = π / pixel.  On
    small maps the lowest log bins can fall between lattice modes; an edge that would leave a bin
    without modes is dropped (that bin merges with its upper neighbour), so fewer than ``nbins`` bins
    can come back, never an empty one.
    """
    npix = _npix(npix)
    pix = positive(pixel_arcmin, "pixel_arcmin")
    if isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or nbins < 1:
        raise ValueError(f"nbins: expected a positive integer, got {nbins!r}")
    if npix < 8:
        raise ValueError(f"npix: default ℓ edges need maps of at least 8x8 pixels, got {npix}")
    side = npix * pix * ARCMIN
    ell_min = 2.0 * np.pi / side
    ell_nyq = np.pi / (pix * ARCMIN)
    edges = list(np.geomspace(2.0 * ell_min, ell_nyq, int(nbins) + 1))
    while True:
        n_modes = mode_binning(npix, pix, tuple(edges))["n_modes"]
        empty = np.flatnonzero(n_modes == 0)
        if empty.size == 0:
            return np.asarray(edges)
        i = int(empty[0])
        # drop the upper edge of the empty bin (the lower one for the last bin)
        del edges[i + 1 if i + 1 < len(edges) - 1 else i]


def power_spectrum(
    maps: ArrayLike, pixel_arcmin: float, ell_edges: Any, cross: bool = False
) -> tuple[ArrayLike, ArrayLike]:
    """Binned flat-sky angular power spectrum C_ℓ of square maps.

    C_ℓ = A_pix² |FFT(κ)|² / A (A_pix pixel area, A map area, both in steradians), averaged over all
    modes of the full Fourier plane with ℓ_lo < ℓ <= ℓ_hi; ℓ of a mode is 2π |k| with k in cycles per
    radian.  The map is not apodized, mean-subtracted or deconvolved by the pixel window.

    Args:
        maps: [H, W], [B, H, W] or [B, C, H, W] with H == W.
        pixel_arcmin: pixel side in arcmin.
        ell_edges: increasing bin edges in ℓ (every bin must contain at least one mode).
        cross: for [B, C, H, W] maps, also return the cross spectra Re<κ_i κ_j*> between channels.

    Returns:
        ``(ell, cl)``: ``ell`` [nbins] is the mode-weighted mean ℓ of each bin; ``cl`` is [nbins],
        [B, nbins], [B, C, nbins] or, with ``cross``, [B, C, C, nbins] (symmetric in the channel axes).
    """
    batch = prepare_maps(maps, "maps")
    pix = positive(pixel_arcmin, "pixel_arcmin")
    e = edges_array(ell_edges, "ell_edges")
    if np.any(e < 0):
        raise ValueError(f"ell_edges: multipoles must be >= 0, got {e.tolist()}")
    if cross and len(batch.lead) != 2:
        raise ValueError("cross: cross spectra need maps of shape [B, C, H, W]")
    info = mode_binning(batch.npix, pix, tuple(e.tolist()))
    check_nonempty_bins(info, batch.npix, pix, e)
    nb = e.size - 1
    if cross:
        nchan = batch.lead[1]
        data = batch.data.reshape(-1, nchan, batch.npix, batch.npix)
        cl = cross_spectra(data, pix, info, nb)
        out = cl.reshape(*batch.lead, nchan, nb)
    else:
        cl = auto_spectra(batch.data, pix, info, nb)
        out = cl.reshape(*batch.lead, nb)
    ell = torch.as_tensor(info["ell_mean"], device=batch.data.device)
    return to_output(ell, batch), to_output(out, batch)


def check_nonempty_bins(info: dict[str, np.ndarray], npix: int, pix: float, e: np.ndarray) -> None:
    """Refuse ℓ edges with a bin that holds no Fourier mode of the map (one line naming the bin)."""
    empty = np.flatnonzero(info["n_modes"] == 0)
    if empty.size:
        i = int(empty[0])
        raise ValueError(
            f"ell_edges: bin {i} (ℓ in ({e[i]:.6g}, {e[i + 1]:.6g}]) contains no Fourier mode of a "
            f"{npix}x{npix} map with {pix:g} arcmin pixels (ℓ spacing {2 * np.pi / (npix * pix * ARCMIN):.4g}); "
            "use wider bins, e.g. default_ell_edges()"
        )


def mode_coef(info: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """Per-mode factor turning |FFT|² into a bin average: scale · weight / n_modes of the mode's bin
    (0 for modes in no bin)."""
    b = info["bin"]
    coef = np.zeros(b.size)
    ok = b >= 0
    coef[ok] = scale * info["weight"][ok] / info["n_modes"][b[ok]]
    return coef


class _BinReducer:
    """Turns per-mode power [..., M] into bin averages [..., nbins] (weights / n_modes per mode).

    A dense [M, nbins] matrix product is fastest for the usual map sizes; for very large maps, where
    that matrix would be big, the valid modes are gathered and summed with ``index_add_``.
    """

    def __init__(self, info: dict[str, np.ndarray], nb: int, scale: float, device, dtype) -> None:
        b = info["bin"]
        valid = b >= 0
        self.nb = nb
        self.dense = b.size * nb <= (1 << 23)
        vals = torch.as_tensor(mode_coef(info, scale)[valid], dtype=dtype, device=device)
        rows = torch.as_tensor(np.flatnonzero(valid), device=device)
        cols = torch.as_tensor(b[valid], device=device)
        if self.dense:
            self.mat = torch.zeros(b.size, nb, dtype=dtype, device=device)
            self.mat[rows, cols] = vals
        else:
            self.rows, self.cols, self.vals = rows, cols, vals

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return p @ self.mat
        src = p.index_select(-1, self.rows) * self.vals
        out = torch.zeros(*p.shape[:-1], self.nb, dtype=p.dtype, device=p.device)
        return out.index_add_(-1, self.cols, src)


def auto_spectra(
    x: torch.Tensor,
    pixel_arcmin: float,
    info: dict[str, np.ndarray],
    nb: int,
    fft: torch.Tensor | None = None,
) -> torch.Tensor:
    """C_ℓ of [N, H, W] maps (internal; ``fft`` may pass a precomputed rfft2 of ``x``)."""
    n, npix = x.shape[0], x.shape[-1]
    a_pix = (pixel_arcmin * ARCMIN) ** 2
    reduce = _BinReducer(info, nb, a_pix / npix**2, x.device, x.dtype)
    out = torch.empty(n, nb, dtype=x.dtype, device=x.device)
    for sl in chunks(n, npix * npix, x.device):
        f = torch.fft.rfft2(x[sl]) if fft is None else fft[sl]
        p = f.real.square() + f.imag.square()
        out[sl] = reduce(p.reshape(p.shape[0], -1))
    return out


def cross_spectra(x: torch.Tensor, pixel_arcmin: float, info: dict[str, np.ndarray], nb: int) -> torch.Tensor:
    """[N, C, C, nbins] auto and cross C_ℓ of [N, C, H, W] maps (internal, no validation)."""
    n, c, npix = x.shape[0], x.shape[1], x.shape[-1]
    a_pix = (pixel_arcmin * ARCMIN) ** 2
    reduce = _BinReducer(info, nb, a_pix / npix**2, x.device, x.dtype)
    out = torch.empty(n, c, c, nb, dtype=x.dtype, device=x.device)
    for sl in chunks(n, c * c * npix * npix, x.device):
        f = torch.fft.rfft2(x[sl])
        f = f.reshape(f.shape[0], c, -1)
        # Re(F_i conj F_j): the imaginary part cancels between k and -k over the full plane
        p = torch.einsum("ncm,ndm->ncdm", f.real, f.real) + torch.einsum("ncm,ndm->ncdm", f.imag, f.imag)
        out[sl] = reduce(p)
    return out


__all__ = ["ARCMIN", "default_ell_edges", "ell_modes", "power_spectrum"]
