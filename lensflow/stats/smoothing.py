"""Gaussian smoothing of κ maps, batched through FFTs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._array import ArrayLike, chunks, finish, positive, prepare_maps

#: Kernel support in units of σ, as in :func:`scipy.ndimage.gaussian_filter`.
TRUNCATE = 4.0


def gaussian_weights(sigma_pix: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Sampled 1-D Gaussian of width ``sigma_pix`` pixels, unit sum, radius int(truncate σ + 0.5).

    The same weights as :func:`scipy.ndimage.gaussian_filter`, so both smooth identically.
    """
    radius = int(truncate * sigma_pix + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_pix) ** 2)
    return w / w.sum()


def _next_fast(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast sizes for every FFT backend)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


@functools.lru_cache(maxsize=64)
def _transfer_1d(size: int, sigma_pix: float) -> np.ndarray:
    """DFT of the sampled Gaussian laid on a circle of ``size`` points (wrapping as often as needed)."""
    w = gaussian_weights(sigma_pix)
    radius = (w.size - 1) // 2
    k = np.zeros(size)
    np.add.at(k, np.arange(-radius, radius + 1) % size, w)
    # the kernel is even on the circle, so its DFT is real
    return np.fft.fft(k).real


def fft_size(npix: int, sigma_pix: Sequence[float], periodic: bool) -> int:
    """FFT size for smoothing npix maps: npix if periodic, else room for zero padding of the widest kernel."""
    if periodic:
        return npix
    radius = max((int(TRUNCATE * s + 0.5) for s in sigma_pix if s > 0), default=0)
    return _next_fast(npix + radius)


#: Kernels up to this radius (pixels) are applied as separable shifted sums, wider ones by FFT: for a
#: 128x128 map the direct sums are faster up to about 25 taps, and they need no padding to a fast size.
DIRECT_MAX_RADIUS = 12


def _direct(x: torch.Tensor, w: np.ndarray, periodic: bool) -> torch.Tensor:
    """Separable convolution of [N, H, W] maps with the 1-D kernel ``w`` by shifted, weighted sums."""
    r = (w.size - 1) // 2
    weights = w.tolist()
    if not periodic:
        return _direct_zero(x, weights, r)
    mode = "circular"
    npix = x.shape[-1]
    xp = F.pad(x.unsqueeze(1), (r, r, 0, 0), mode=mode).squeeze(1)
    y = xp[..., r : r + npix] * weights[r]
    for j, wj in enumerate(weights):
        if j != r:
            y.add_(xp[..., j : j + npix], alpha=wj)
    yp = F.pad(y.unsqueeze(1), (0, 0, r, r), mode=mode).squeeze(1)
    z = yp[..., r : r + npix, :] * weights[r]
    for j, wj in enumerate(weights):
        if j != r:
            z.add_(yp[..., j : j + npix, :], alpha=wj)
    return z


def _direct_zero(x: torch.Tensor, weights: list[float], r: int) -> torch.Tensor:
    """:func:`_direct` with zero boundary, without padded copies: each tap adds into the part of the
    output it reaches.  Taps are added in the same order as over a zero-padded map (the skipped
    terms are exact zeros), so the sums are identical."""
    npix = x.shape[-1]
    y = x * weights[r]
    for j, wj in enumerate(weights):
        k = j - r  # output pixel i takes x[i + k]
        if k < 0 and -k < npix:
            y[..., -k:].add_(x[..., : npix + k], alpha=wj)
        elif 0 < k < npix:
            y[..., : npix - k].add_(x[..., k:], alpha=wj)
    h = x.shape[-2]
    z = y * weights[r]
    for j, wj in enumerate(weights):
        k = j - r
        if k < 0 and -k < h:
            z[..., -k:, :].add_(y[..., : h + k, :], alpha=wj)
        elif 0 < k < h:
            z[..., : h - k, :].add_(y[..., k:, :], alpha=wj)
    return z


def smooth_many(
    x: torch.Tensor,
    pixel_arcmin: float,
    sigmas_arcmin: Sequence[float],
    periodic: bool,
    fft: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Smooth [N, H, W] maps at several scales (internal, no validation).

    Narrow kernels: separable shifted sums (zero or circular padding).  Wide kernels: FFT, one forward
    transform shared by all of them; zero boundary pads the map to at least npix + kernel radius, so
    the circular convolution of the padded map equals the linear one on the npix x npix output.
    ``fft`` may pass ``rfft2(x)`` when ``periodic`` (shared with the power spectrum).  Both ways give the
    same sums up to rounding.
    """
    npix = x.shape[-1]
    sig_pix = [s / pixel_arcmin for s in sigmas_arcmin]
    radius = [int(TRUNCATE * s + 0.5) for s in sig_pix]
    direct = [s > 0 and r <= DIRECT_MAX_RADIUS and r < npix for s, r in zip(sig_pix, radius, strict=True)]
    wide = [s for s, d in zip(sig_pix, direct, strict=True) if s > 0 and not d]
    size = fft_size(npix, wide, periodic)
    f = fft if (periodic and fft is not None) else None
    if f is None and wide:
        f = torch.fft.rfft2(x, s=(size, size))
    out = []
    for s, d in zip(sig_pix, direct, strict=True):
        if s == 0:
            out.append(x)
        elif d:
            out.append(_direct(x, gaussian_weights(s), periodic))
        else:
            t = torch.as_tensor(_transfer_1d(size, s), dtype=x.dtype, device=x.device)
            transfer = t[:, None] * t[None, : size // 2 + 1]
            y = torch.fft.irfft2(f * transfer, s=(size, size))
            out.append(y[..., :npix, :npix])
    return out


def smooth(maps: ArrayLike, pixel_arcmin: float, sigma_arcmin: float, periodic: bool = False) -> ArrayLike:
    """Convolve maps with a Gaussian of standard deviation ``sigma_arcmin`` (σ, not FWHM = 2.355 σ).

    The kernel is the sampled Gaussian truncated at 4σ and normalized to unit sum (the weights of
    :func:`scipy.ndimage.gaussian_filter`), applied as separable sums for narrow kernels and by FFT for
    wide ones.  Boundary: zero outside the map (``periodic=False``, scipy's
    ``mode="constant"``) or periodic (scipy's ``mode="wrap"``).  ``sigma_arcmin=0`` returns the maps
    unchanged.  Same shape and type as the input.
    """
    batch = prepare_maps(maps, "maps", min_size=1)
    pix = positive(pixel_arcmin, "pixel_arcmin")
    sig = positive(sigma_arcmin, "sigma_arcmin", allow_zero=True)
    x = batch.data
    out = torch.empty_like(x)
    for sl in chunks(batch.n, batch.npix * batch.npix, x.device):
        out[sl] = smooth_many(x[sl], pix, [sig], bool(periodic))[0]
    return finish(batch, out)


__all__ = ["gaussian_weights", "smooth"]
