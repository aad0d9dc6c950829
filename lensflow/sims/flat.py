"""Flat-sky Gaussian and shifted-lognormal convergence maps with a target C_ℓ^κκ.

How a map is made
-----------------
Fields live on a periodic ``M x M`` grid of pixel side Δ (``M = pad * npix`` for non-periodic maps,
``M = npix`` for periodic tiles). The grid's Fourier modes ℓ = 2π (i, j) / (M Δ) carry the target
spectrum ``P(ℓ) = C_ℓ`` (the ℓ = 0 mode carries none), so the pixel covariance of the periodic field
is exactly the band-limited correlation function ξ(Δx) = (1/A) Σ_ℓ C_ℓ e^{iℓ·Δx}, A = (MΔ)², and the
pixel variance is Σ_ℓ C_ℓ / A (the integral of ℓC_ℓ/2π over the grid's modes). Pixel values are the
band-limited field sampled at pixel centres: no pixel window is applied (multiply the theory by
sinc²(ℓ_xΔ/2) sinc²(ℓ_yΔ/2) to compare with pixel-averaged ray-traced maps).

*Gaussian*: white noise is coloured by the symmetric square root of the C x C spectral matrix at every
mode, which gives the tomographic channels their auto and cross spectra.

*Shifted lognormal* (e.g. Hilbert, Hartlap & Schneider 2011; Xavier et al. 2016):
κ_i = λ_i (exp(g_i - σ_i²/2) - 1) with Gaussian g. The Gaussian correlation is solved *on the grid*:
ξ_G^{ij} = ln(1 + ξ^{ij} / (λ_i λ_j)) lag by lag, so the lognormal field's pixel covariance equals
the target ξ^{ij} exactly whenever the Gaussian spectral matrices are positive semi-definite. Where
they are not (a small amount of power at the highest ℓ) negative eigenvalues are set to zero;
:attr:`FlatSimulator.clipped_power` reports the fraction of Gaussian power removed. κ >= -λ always.
The shift λ per source bin defaults to Hilbert et al. (2011), see
:func:`lensflow.sims.theory.hilbert2011_shift`.

*Non-periodic maps* (default) are the ``npix x npix`` corner of the padded periodic field, so opposite
edges are uncorrelated beyond what ξ gives, as in a patch of the sky. Their FFT power spectrum is the
target convolved with the crop window (mode coupling); periodic tiles have none.

Reproducibility: map ``i`` is drawn (as Fourier-space white noise) from ``SeedSequence(seed, spawn_key=(i,))``,
so a map depends only on the seed and its index, not on the batch size or on how many maps are requested.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.fft

from lensflow._util.units import ARCMIN
from lensflow.sims.exact import FlatLikelihood
from lensflow.sims.theory import convergence_cl, hilbert2011_shift, parse_sources, source_labels

KINDS: tuple[str, ...] = ("gaussian", "lognormal")


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _psd_sqrt(mat: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric square root of PSD matrices [C, C, ...] (negative eigenvalues clipped).

    Returns the root and the fraction of the trace removed by clipping.
    """
    C = mat.shape[0]
    if C == 1:
        p = mat[0, 0]
        neg = np.clip(p, None, 0.0)
        removed = float(-neg.sum() / max(np.abs(p).sum(), 1e-300))
        return np.sqrt(np.clip(p, 0.0, None))[None, None], removed
    m = np.moveaxis(mat, (0, 1), (-2, -1))
    m = 0.5 * (m + np.swapaxes(m, -1, -2))
    w, v = np.linalg.eigh(m)
    removed = float(-np.clip(w, None, 0.0).sum() / max(np.abs(w).sum(), 1e-300))
    root = (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)
    return np.moveaxis(root, (-2, -1), (0, 1)), removed


def _spectrum_on(ell: np.ndarray, cl_func: Callable[[np.ndarray], np.ndarray], channels: int) -> np.ndarray:
    """Evaluate C_ℓ [C, C, *ell.shape] by log-log interpolation from 512 samples (theory calls are costly)."""
    lo, hi = float(ell[ell > 0].min()), float(ell.max())
    samples = np.geomspace(lo / 1.01, hi * 1.01, 512)
    cl = np.asarray(cl_func(samples), dtype=float)
    if cl.ndim == 1:
        cl = cl[None, None]
    if cl.shape != (channels, channels, samples.size):
        raise ValueError(
            f"the spectrum function returned shape {cl.shape}, expected "
            f"[{channels}, {channels}, {samples.size}] or [{samples.size}] for one channel"
        )
    if not np.isfinite(cl).all():
        raise ValueError("the target C_ell has NaN or Inf values")
    out = np.zeros((channels, channels, *ell.shape))
    pos = ell > 0
    x = np.log(ell[pos])
    for i in range(channels):
        for j in range(channels):
            c = cl[i, j]
            if np.all(c > 0):
                out[i, j, pos] = np.exp(np.interp(x, np.log(samples), np.log(c)))
            else:
                out[i, j, pos] = np.interp(x, np.log(samples), c)
    return out


class FlatSimulator:
    """Precomputed flat-sky simulator for one cosmology and set of source bins.

    Args:
        npix: map side in pixels.
        pixel_arcmin: pixel side in arcmin.
        cosmology: cosmology dict (see :mod:`lensflow.sims.theory`); unused when ``cl`` is given.
        z_source: source plane(s) / n(z) bin(s); one channel each.
        kind: ``"gaussian"`` or ``"lognormal"``.
        periodic: periodic tiles (no padding) instead of crops of a padded periodic field.
        shift: lognormal shift λ, a number or one per channel; ``None`` = Hilbert et al. 2011.
        pad: side of the periodic grid in units of ``npix`` for non-periodic maps (>= 2).
        cl: optional target spectrum ``cl(ell) -> [n_ell]`` or ``[C, C, n_ell]`` replacing the theory.
        nonlinear: halofit (default) or linear matter power for the theory spectrum.
    """

    def __init__(
        self,
        npix: int,
        pixel_arcmin: float,
        cosmology: Mapping[str, Any] | None = None,
        z_source: Any = 1.0,
        *,
        kind: str = "lognormal",
        periodic: bool = False,
        shift: float | Sequence[float] | None = None,
        pad: float = 2,
        cl: Callable[[np.ndarray], np.ndarray] | None = None,
        nonlinear: bool = True,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if int(npix) != npix or npix < 2:
            raise ValueError(f"npix must be an integer >= 2, got {npix!r}")
        if not (isinstance(pixel_arcmin, (int, float, np.number)) and math.isfinite(pixel_arcmin) and pixel_arcmin > 0):
            raise ValueError(f"pixel_arcmin must be a positive number, got {pixel_arcmin!r}")
        self.npix = int(npix)
        self.pixel_arcmin = float(pixel_arcmin)
        self.kind = kind
        self.periodic = bool(periodic)
        self.sources = parse_sources(z_source)
        self.source_redshifts = source_labels(self.sources)
        self.channels = C = len(self.sources)
        if self.periodic:
            M = self.npix
        else:
            if not pad >= 2:
                raise ValueError(f"pad must be >= 2 for non-periodic maps, got {pad!r}")
            M = int(math.ceil(pad * self.npix))
            M += M % 2
        self.grid = M
        d = self.pixel_arcmin * ARCMIN
        self._d = d
        if cl is None:
            if cosmology is None:
                raise ValueError("give either a cosmology or a target spectrum cl")
            sources = self.sources

            def cl_func(ell: np.ndarray) -> np.ndarray:
                return convergence_cl(ell, cosmology, sources, nonlinear=nonlinear)
        else:
            cl_func = cl
        lx = 2 * np.pi * np.fft.fftfreq(M, d=d)
        ly = 2 * np.pi * np.fft.rfftfreq(M, d=d)
        ell = np.hypot(lx[:, None], ly[None, :])
        power = _spectrum_on(ell, cl_func, C)  # [C, C, M, M//2+1]
        self.ell_grid = ell
        #: Target pixel covariance at zero lag per channel: Σ_ℓ C_ℓ / A (the pixel variance).
        self.variance = np.array([self._xi(power[i, i])[0, 0] for i in range(C)])
        self.clipped_power = 0.0
        if kind == "gaussian":
            self.shift = None
            root, self.clipped_power = _psd_sqrt(power)
            self._sigma2 = None
        else:
            lam = (
                hilbert2011_shift(self.sources)
                if shift is None
                else np.broadcast_to(np.asarray(shift, dtype=float), (C,)).copy()
            )
            if lam.shape != (C,) or not np.all(np.isfinite(lam)) or np.any(lam <= 0):
                raise ValueError(f"shift must be a positive number or one per channel ({C}), got {shift!r}")
            self.shift = lam
            xi = np.stack([np.stack([self._xi(power[i, j]) for j in range(C)]) for i in range(C)])
            arg = 1.0 + xi / (lam[:, None, None, None] * lam[None, :, None, None])
            if arg.min() <= 0:
                raise ValueError(
                    f"lognormal shift {lam.tolist()} is too small for this spectrum: "
                    "1 + xi/lambda^2 <= 0 at some lag; use a larger shift"
                )
            pg = np.fft.rfft2(np.log(arg)).real * d * d
            root, self.clipped_power = _psd_sqrt(pg)
            clipped = np.einsum("ik...,jk...->ij...", root, root)
            self._sigma2 = np.array([self._xi(clipped[i, i])[0, 0] for i in range(C)])
        # Colouring filter on the rfft half-plane: F = sqrt(P) W / Δ for white noise W.
        self._filter = (root / d).astype(np.float32)
        self._likelihood: FlatLikelihood | None = None

    # -- exact likelihood ---------------------------------------------------------------------------------
    @property
    def likelihood(self) -> FlatLikelihood:
        """The exact density of this simulator's maps (:class:`~lensflow.sims.exact.FlatLikelihood`), built once."""
        if self._likelihood is None:
            self._likelihood = FlatLikelihood(self)
        return self._likelihood

    def log_prob(self, maps: np.ndarray) -> np.ndarray:
        """Exact ``log p(κ)`` of maps [n, C, npix, npix] (κ units) in nats per map, float64 [n].

        The same convention as ``Glow.log_prob``, so ``mean(sim.log_prob(x) - glow.log_prob(x))`` is the
        emulator's KL divergence from the simulator on maps ``x`` drawn from it. Maps of the wrong shape or
        channel count, with NaN, or (lognormal) with κ <= -λ give a one-line ``ValueError``.
        """
        return self.likelihood.log_prob(maps)

    def entropy(self) -> float:
        """Differential entropy of one map, nats (closed form; ``E[-log_prob]`` over the simulator's maps)."""
        return self.likelihood.entropy()

    def _xi(self, p_half: np.ndarray) -> np.ndarray:
        """Periodic correlation function on the grid from a half-plane spectrum: irfft2(P) / Δ²."""
        return np.fft.irfft2(p_half, s=(self.grid, self.grid)) / (self._d * self._d)

    def _fill_noise(self, out: np.ndarray, seed: int | Sequence[int], index: int) -> None:
        """Standard complex normals (unit variance per part) for map ``index`` into ``out`` [C, M, M//2+1]."""
        ss = np.random.SeedSequence(seed, spawn_key=(index,))
        rng = np.random.Generator(np.random.PCG64(ss))
        rng.standard_normal(out=out.view(np.float32), dtype=np.float32)

    def generate(self, n: int, seed: int | Sequence[int] = 0, start: int = 0, batch: int | None = None) -> np.ndarray:
        """``n`` maps float32 [n, C, npix, npix] with indices ``start .. start+n-1`` of stream ``seed``."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if int(start) != start or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        n, start = int(n), int(start)
        C, M, N = self.channels, self.grid, self.npix
        Mh = M // 2 + 1
        if batch is None:
            batch = max(1, (1 << 22) // (C * M * M))
        out = np.empty((n, C, N, N), dtype=np.float32)
        # White noise is drawn directly on the rfft half-plane: E|W|^2 = M^2 per mode, i.e. M/sqrt(2)
        # per real part, folded into the filter.
        filt = self._filter * np.float32(M / math.sqrt(2.0))
        self_conj = [0] + ([M // 2] if M % 2 == 0 else [])  # columns holding both k and -k
        flip = (-np.arange(M)) % M
        with ThreadPoolExecutor(_workers()) as pool:
            for lo in range(0, n, batch):
                b = min(batch, n - lo)
                w = np.empty((b, C, M, Mh), dtype=np.complex64)
                first = start + lo
                list(pool.map(self._fill_noise, w, [seed] * b, range(first, first + b)))
                # Make the self-conjugate columns Hermitian, W(-kx) = conj W(kx), keeping unit variance.
                for c in self_conj:
                    col = w[..., c]
                    w[..., c] = (col + np.conj(col[..., flip])) * np.float32(1 / math.sqrt(2.0))
                if C == 1:
                    w *= filt[0, 0]
                else:
                    w = np.stack([sum(filt[i, j] * w[:, j] for j in range(C)) for i in range(C)], axis=1)
                # Inverse FFT row transform first, keeping only the N rows of the crop, then columns.
                h = scipy.fft.ifft(w, axis=-2, workers=_workers())[..., :N, :]
                g = scipy.fft.irfft(h, n=M, axis=-1, workers=_workers())[..., :N]
                if self.kind == "lognormal":
                    lam = self.shift.astype(np.float32)[:, None, None]
                    half = (0.5 * self._sigma2).astype(np.float32)[:, None, None]
                    g = lam * np.expm1(g - half)
                out[lo : lo + b] = g
        return out


def simulate_maps(
    n: int,
    npix: int,
    pixel_arcmin: float,
    cosmology: Mapping[str, Any],
    z_source: Any,
    kind: str = "lognormal",
    seed: int = 0,
    periodic: bool = False,
    shift: float | Sequence[float] | None = None,
    *,
    pad: float = 2,
    nonlinear: bool = True,
) -> np.ndarray:
    """Simulate ``n`` flat-sky κ maps float32 [n, C, npix, npix] (see the module docstring).

    Args:
        n: number of maps.
        npix: map side in pixels.
        pixel_arcmin: pixel side in arcmin.
        cosmology: cosmology dict (``Omega_m, Omega_b, h, sigma_8, n_s`` [, ``w0, m_nu``]).
        z_source: source plane(s) or n(z) bin(s); one channel each.
        kind: ``"gaussian"`` or ``"lognormal"``.
        seed: seed of the map stream (map i depends only on ``seed`` and i).
        periodic: periodic tiles instead of crops of a padded periodic field.
        shift: lognormal shift λ per channel; ``None`` = Hilbert et al. 2011.
        pad: periodic grid side over ``npix`` for non-periodic maps (>= 2).
        nonlinear: halofit (default) or linear theory spectrum.
    """
    sim = FlatSimulator(
        npix, pixel_arcmin, cosmology, z_source, kind=kind, periodic=periodic, shift=shift, pad=pad, nonlinear=nonlinear
    )
    return sim.generate(n, seed=seed)
