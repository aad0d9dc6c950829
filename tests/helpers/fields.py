"""Random test maps: Gaussian random fields (periodic, of a given spectrum) and smoothed skewed κ-like maps.

The one field maker of the tests. Every function takes its random numbers from the ``rng`` (or seed) it is
given, so a test's maps are fixed by its seed.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch

from lensflow._util.units import ARCMIN


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def periodic_grf(n: int, amplitude: np.ndarray, rng: np.random.Generator | int, std: float | None = None) -> np.ndarray:
    """[n, N, N] periodic Gaussian fields ``ifft2(amplitude * fft2(white))``: with ``amplitude = sqrt(P)``
    (P per full-plane DFT mode, symmetric under k -> -k) the covariance is U^H diag(P) U for the unitary DFT U.
    With ``std`` the fields are then scaled to that standard deviation over all ``n`` maps together."""
    npix = amplitude.shape[-1]
    w = _rng(rng).standard_normal((n, npix, npix))
    f = np.fft.ifft2(amplitude * np.fft.fft2(w)).real
    return f if std is None else std * f / f.std()


def power_law_amplitude(npix: int, slope: float) -> np.ndarray:
    """``|k|^slope`` per DFT mode (k in cycles per pixel), 0 at k = 0: a red spectrum's amplitude."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(npix), np.fft.fftfreq(npix), indexing="ij"))
    return np.power(k, slope, out=np.zeros_like(k), where=k > 0)


def ell_modes(npix: int, pixel_arcmin: float) -> tuple[np.ndarray, np.ndarray]:
    """ℓ (rad⁻¹) of the rfft2 modes of ``npix x npix`` maps and their multiplicity in the full Fourier plane."""
    d = pixel_arcmin * ARCMIN
    ell = 2 * np.pi * np.hypot(np.fft.fftfreq(npix, d)[:, None], np.fft.rfftfreq(npix, d)[None, :])
    mult = np.full(npix // 2 + 1, 2.0)
    mult[0] = mult[-1] = 1.0  # npix even
    return ell, np.broadcast_to(mult, ell.shape)


def cl_grf(n: int, npix: int, pixel_arcmin: float, cl, rng: np.random.Generator | int) -> np.ndarray:
    """[n, npix, npix] periodic Gaussian maps whose modes have <A_pix² |FFT|² / A> = cl(ℓ) (ℓ in rad⁻¹, C_ℓ in sr)."""
    ell, _ = ell_modes(npix, pixel_arcmin)
    a_pix = (pixel_arcmin * ARCMIN) ** 2
    amp = np.sqrt(cl(ell) / a_pix)
    white = _rng(rng).standard_normal((n, npix, npix))
    return np.fft.irfft2(np.fft.rfft2(white) * amp, s=(npix, npix))


def skewed_maps(shape: tuple[int, ...], sigma_pix: float, rng: np.random.Generator | int, periodic: bool) -> np.ndarray:
    """κ-like maps [..., H, W]: white noise through scipy's Gaussian filter of ``sigma_pix`` pixels (``wrap``
    when periodic, else ``reflect``), scaled to unit variance, then 0.01 (g + 0.3 g²) for a positive skew."""
    w = _rng(rng).standard_normal(shape)
    if periodic:
        g = ndi.gaussian_filter(w, [0] * (len(shape) - 2) + [sigma_pix, sigma_pix], mode="wrap")
    else:
        flat = w.reshape(-1, *shape[-2:])
        g = np.stack([ndi.gaussian_filter(m, sigma_pix, mode="reflect") for m in flat]).reshape(shape)
    g /= g.std()
    return 0.01 * (g + 0.3 * g**2)


def lognormal_tensor(n: int, channels: int, size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[n, channels, size, size] white shifted-lognormal pixels (exp(0.4 g) - 1) * 0.03 from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(0.4 * torch.randn(n, channels, size, size, generator=g, dtype=dtype)) - 1.0) * 0.03
