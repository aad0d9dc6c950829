"""Exact log-densities of the flat simulators' κ maps (the truth an emulator's likelihood is measured against).

What is exact
-------------
:class:`~lensflow.sims.flat.FlatSimulator` colours complex white noise on the rfft half-plane of a periodic
``M x M`` grid with the float32 filter ``F(ℓ)`` (``C x C`` per mode), so the Gaussian field ``g`` is a
stationary periodic field whose cross-covariance at lag Δ is exactly

    ξ_ij(Δ) = (1/M²) Σ_ℓ S_ij(ℓ) e^{iℓ·Δ},   S(ℓ) = F(ℓ) F(ℓ)ᵀ   (``irfft2`` of S),

computed here in float64 from the very filter the simulator uses (no re-derivation from theory). A map is
the ``npix x npix`` corner of ``g`` (or all of it for periodic tiles), so for the Gaussian kind it is
multivariate normal with the crop of that covariance, and for the shifted-lognormal kind
κ = λ (exp(g − σ²/2) − 1) channel by channel, a pixel-wise bijection with
log|dκ/dg| = log(κ + λ), so

    log p(κ) = log N(g(κ); 0, Σ) − Σ_pixels log(κ + λ),   g(κ) = log1p(κ/λ) + σ²/2.

Densities are in nats per map, of κ in κ units: the same convention as ``Glow.log_prob``, so the KL gap
``E[log p_exact − log p_model]`` of an emulator can be read off on the same maps.

How it is computed
------------------
*Non-periodic crops* — a dense Cholesky factor of the ``C·npix²`` covariance, built block-Toeplitz from ξ and
cached on the likelihood object (``C·npix² ≤ 16384``: 64²×4 channels, 128²×1; about 2 GB and a minute on two
cores at the largest size). *Periodic tiles* — the covariance is diagonal in Fourier space, so any size
costs one FFT per map: ``gᵀΣ⁻¹g = (1/M²) Σ_ℓ ĝ(ℓ)ᴴ S(ℓ)⁻¹ ĝ(ℓ)`` and ``log det Σ = Σ_ℓ log det S(ℓ)``.

Degenerate modes: on periodic tiles a mode with no power (ℓ = 0 of the Gaussian kind, whose target carries
none; modes whose negative Gaussian power was clipped) is exactly zero in every map, so the maps live on a
subspace and have no density in the full space. The periodic likelihood is then the density on that
subspace (Lebesgue measure on the orthogonal complement of the null modes) and reports the number of null
modes in :attr:`FlatLikelihood.null_modes`. A flow's density is on the full space, so a KL gap against a
degenerate truth is not meaningful: train and measure emulators on crops (the default) or on lognormal tiles.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

if TYPE_CHECKING:  # pragma: no cover
    from lensflow.sims.flat import FlatSimulator

__all__ = ["DENSE_MAX_DIMS", "FlatLikelihood", "kl_gap_bits"]

#: Largest ``C * npix**2`` factorized densely (a 16384² float64 matrix is 2 GiB).
DENSE_MAX_DIMS = 16384
_LOG_2PI = math.log(2.0 * math.pi)
# Relative eigenvalue below which a periodic mode counts as carrying no power (float32 filter round-off
# is ~1e-7 of the largest amplitude, i.e. ~1e-14 in power).
_NULL_TOL = 1e-12


class FlatLikelihood:
    """Exact log-density of the maps of one :class:`~lensflow.sims.flat.FlatSimulator`.

    Built from the simulator's own filter and transform; the factorization (dense Cholesky for crops,
    per-mode spectra for periodic tiles) is computed on first use and kept.

    Args:
        sim: the simulator whose maps are scored.
    """

    def __init__(self, sim: FlatSimulator) -> None:
        self.channels = sim.channels
        self.npix = sim.npix
        self.grid = sim.grid
        self.periodic = sim.periodic
        self.kind = sim.kind
        self.shift = None if sim.shift is None else np.asarray(sim.shift, dtype=np.float64)
        self.sigma2 = None if sim._sigma2 is None else np.asarray(sim._sigma2, dtype=np.float64)
        f = sim._filter.astype(np.float64)  # [C, C, M, M//2+1], exactly what generate() colours with
        self._spectrum_half = np.einsum("ik...,jk...->ij...", f, f)
        self.num_dims = self.channels * self.npix**2
        self._chol: np.ndarray | None = None
        self._logdet: float | None = None
        self._modes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.null_modes = 0

    # -- the Gaussian field --------------------------------------------------------------------------------------
    def lag_covariance(self) -> np.ndarray:
        """ξ_ij(Δ) float64 [C, C, M, M] of the periodic Gaussian field g (κ² units for the Gaussian kind)."""
        M = self.grid
        return np.fft.irfft2(self._spectrum_half, s=(M, M))

    def covariance(self) -> np.ndarray:
        """Dense covariance float64 [D, D] of one map's field values, D = C·npix², channel-major, row-major pixels."""
        C, N, M = self.channels, self.npix, self.grid
        xi = self.lag_covariance()
        d = np.arange(N)
        lag = (d[:, None] - d[None, :]) % M  # [N, N]: (a - b) mod M
        # Σ[(i, x1, y1), (j, x2, y2)] = ξ_ij(x1 - x2, y1 - y2): block-Toeplitz in x, Toeplitz blocks in y
        cov = xi[:, :, lag[:, None, :, None], lag[None, :, None, :]]  # [C, C, N, N, N, N] as (x1, y1, x2, y2)
        return np.ascontiguousarray(cov.transpose(0, 2, 3, 1, 4, 5)).reshape(C * N * N, C * N * N)

    def _dense(self) -> tuple[np.ndarray, float]:
        if self._chol is None:
            if self.num_dims > DENSE_MAX_DIMS:
                raise ValueError(
                    f"maps: the exact likelihood of non-periodic {self.channels}x{self.npix}² maps needs a dense "
                    f"{self.num_dims}² covariance (limit {DENSE_MAX_DIMS}); use periodic tiles (sim.periodic=true) "
                    "or smaller maps"
                )
            cov = self.covariance()
            try:
                chol = scipy.linalg.cholesky(cov, lower=True, overwrite_a=True, check_finite=False)
            except np.linalg.LinAlgError:
                raise ValueError(
                    "maps: the crop covariance of this simulator is singular (too little power in too many modes), "
                    "so its maps have no density"
                ) from None
            self._chol = chol
            self._logdet = 2.0 * float(np.log(np.diag(chol)).sum())
        return self._chol, float(self._logdet)

    def _fourier(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-mode eigen-decomposition of S on the full grid: (eigenvalues [M, M, C], vectors [M, M, C, C], mask)."""
        if self._modes is None:
            M = self.grid
            half = self._spectrum_half
            kx = (-np.arange(M)) % M
            full = np.empty((self.channels, self.channels, M, M))
            full[..., : half.shape[-1]] = half
            # ℓ_y beyond Nyquist: S(kx, ky) = S(-kx, -ky) (S is real and even)
            ky = np.arange(half.shape[-1], M)
            full[..., ky] = half[..., kx, :][..., M - ky]
            s = np.moveaxis(full, (0, 1), (-2, -1))
            w, v = np.linalg.eigh(0.5 * (s + np.swapaxes(s, -1, -2)))
            use = w > _NULL_TOL * w.max()
            self.null_modes = int((~use).sum())
            self._modes = (w, v, use)
        return self._modes

    # -- the map density --------------------------------------------------------------------------------------
    def check_maps(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` as float64 [n, C, npix, npix]; one clear line on a wrong shape, NaN, or κ outside the support."""
        x = np.asarray(maps)
        want = (self.channels, self.npix, self.npix)
        if x.ndim == 3 and tuple(x.shape) == want:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"maps must have shape [n, {want[0]}, {want[1]}, {want[2]}] (n maps of this simulator's channels and "
                f"size), got {tuple(x.shape)}"
            )
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError("maps: contain NaN or Inf")
        if self.shift is not None:
            low = x <= -self.shift[None, :, None, None]
            if low.any():
                c = int(np.nonzero(low.any(axis=(0, 2, 3)))[0][0])
                raise ValueError(
                    f"maps: {int(low.sum())} pixel(s) have κ <= -λ (channel {c}: λ = {self.shift[c]:.6g}), outside the "
                    "support of the shifted-lognormal simulator (κ > -λ), so their density is zero"
                )
        return x

    def gaussian_field(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(g, log|dg/dκ|)``: the Gaussian field behind checked maps [n, C, N, N] and the log-Jacobian [n]."""
        if self.shift is None:
            return maps, np.zeros(maps.shape[0])
        lam = self.shift[None, :, None, None]
        u = np.log1p(maps / lam)
        g = u + 0.5 * self.sigma2[None, :, None, None]
        # dg/dκ = 1/(κ + λ) = 1 / (λ (1 + κ/λ))
        jac = -(u.sum(axis=(2, 3)) + self.npix**2 * np.log(self.shift)[None, :]).sum(axis=1)
        return g, jac

    def log_prob(self, maps: np.ndarray, batch: int = 256) -> np.ndarray:
        """Exact ``log p(κ)`` in nats per map, float64 [n], for maps [n, C, npix, npix] (κ units)."""
        x = self.check_maps(maps)
        out = np.empty(x.shape[0])
        for lo in range(0, x.shape[0], batch):
            g, jac = self.gaussian_field(x[lo : lo + batch])
            out[lo : lo + batch] = self._gauss_log_prob(g) + jac
        return out

    def _gauss_log_prob(self, g: np.ndarray) -> np.ndarray:
        n = g.shape[0]
        if not self.periodic:
            chol, logdet = self._dense()
            white = scipy.linalg.solve_triangular(chol, g.reshape(n, -1).T, lower=True, check_finite=False)
            quad = np.einsum("dn,dn->n", white, white)
            return -0.5 * (quad + logdet + self.num_dims * _LOG_2PI)
        w, v, use = self._fourier()
        M = self.grid
        gh = np.fft.fft2(g, axes=(-2, -1))  # [n, C, M, M]
        proj = np.einsum("mkci,nmkc->nmki", v, np.moveaxis(gh, 1, -1))  # Vᵀĝ per mode (V is real)
        ww = np.where(use, w, 1.0)
        quad = (np.abs(proj) ** 2 / ww)[:, use].sum(axis=1) / M**2
        logdet = float(np.log(w[use]).sum())
        dims = int(use.sum())
        return -0.5 * (quad + logdet + dims * _LOG_2PI)

    def entropy(self) -> float:
        """Differential entropy ``E[-log p(κ)]`` in nats per map, in closed form.

        Gaussian part ½ log det(2πe Σ); the lognormal transform adds ``E[Σ log(κ+λ)] = Σ_c npix² (log λ_c − σ_c²/2)``
        (since ``log(κ+λ) = log λ + g − σ²/2`` and ``E[g] = 0``).
        """
        if self.periodic:
            w, _, use = self._fourier()
            logdet, dims = float(np.log(w[use]).sum()), int(use.sum())
        else:
            logdet, dims = self._dense()[1], self.num_dims
        h = 0.5 * (logdet + dims * (1.0 + _LOG_2PI))
        if self.shift is not None:
            h += float(self.npix**2 * (np.log(self.shift) - 0.5 * self.sigma2).sum())
        return h

    def bits_per_dim(self, maps: np.ndarray) -> np.ndarray:
        """``-log2 p(κ) / (C·npix²)`` per map [n] (the unit of the training loss)."""
        return -self.log_prob(maps) / (self.num_dims * math.log(2.0))


def kl_gap_bits(exact_log_prob: np.ndarray, model_log_prob: np.ndarray, num_dims: int) -> tuple[float, float]:
    """KL gap of a model on maps drawn from the truth, in bits per pixel, and its standard error.

    ``mean(exact - model) / (num_dims ln 2)`` over the maps, with the SE of that paired mean. Its expectation is
    KL(truth ‖ model) / num_dims >= 0, zero only for a perfect model; the pairing cancels the map-to-map scatter
    of log p (hundreds of nats), so a few hundred maps measure gaps of 1e-4 bits/pixel.
    """
    e = np.asarray(exact_log_prob, dtype=np.float64)
    m = np.asarray(model_log_prob, dtype=np.float64)
    if e.shape != m.shape or e.ndim != 1 or e.size < 2:
        raise ValueError(f"log probs must be two 1-D arrays of one length >= 2, got {e.shape} and {m.shape}")
    d = (e - m) / (num_dims * math.log(2.0))
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
