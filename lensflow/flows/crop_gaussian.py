"""Crop Gaussian layer: the exact Gaussian model of a square crop of a stationary field, fitted, not trained.

A stationary field's covariance between pixels ``i`` and ``j`` depends only on their lag: ``Cov = ξ(x_i − x_j)``.
On a periodic map that matrix is diagonal in Fourier space, which is what
:class:`~lensflow.flows.stationary.StationaryGaussian` uses; on a crop it is not (a DCT-diagonal filter is the
model of a field with reflecting edges), and the difference sits where the crop's edges matter, at the largest
scales: on 64² crops of the kappa field the mean mode and the (0, 2) DCT mode correlate at −0.30, and a Glow behind
a diagonal filter left its mocks with 7 % too little scatter in the mean of the map's interior.

This layer estimates the auto- and cross-correlations ``ξ_ab(Δ)`` at every lag of the crop from training maps
(each lag averaged over all pixel pairs of all maps, then over the eight symmetries of the square, which a
statistically isotropic field has), builds the dense ``C·N² × C·N²`` covariance, and whitens with its Cholesky
factor ``L``: ``y = L⁻¹ x``, log-det ``−Σ log diag L``. For a Gaussian field that is the exact likelihood up to the
estimation noise of ``ξ``, which falls as 1/(maps × pixels); for a shifted-lognormal field after the shifted log it
is the exact model too, and the Glow behind it learns only what is not Gaussian.

Only ``ξ`` is stored (a buffer, ``C² (2N−1)²`` numbers); ``L`` is rebuilt on first use (about 1 s for 64²) and
is never saved. The dense factor limits the layer to ``C·N² ≤ max_dims`` (default 8,192: a 64² map, or 2 channels
of 64²); larger maps use the stationary filter. It has no conditioning: ``ξ`` of one cosmology.
``forward(x, cond) -> (y, logdet[B])``, ``inverse(y, cond) -> x``; ``x`` is zero-mean (the preprocessing centres it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import DataInitialized, acc_dtype, check_positive_int

__all__ = ["CropGaussian", "crop_correlation"]

MAX_DIMS = 8192


def crop_correlation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of lagged products of maps ``x`` [B, C, N, N]: ``(sums [C, C, 2N−1, 2N−1], pairs [2N−1, 2N−1])``.

    ``sums[a, b, N−1+du, N−1+dv] = Σ_maps Σ_p x_a(p) x_b(p + Δ)``, Δ = (du, dv), over the pixel pairs inside the crop;
    ``pairs`` counts them per map. ``ξ_ab(Δ) = sums / (B · pairs)``.
    """
    b, c, n, _ = x.shape
    f = torch.fft.rfft2(x.to(torch.float64), s=(2 * n, 2 * n))  # zero padding: no wrap-around of lags
    sums = torch.fft.irfft2(torch.einsum("baij,bcij->acij", f.conj(), f), s=(2 * n, 2 * n))
    ones = torch.fft.rfft2(torch.ones(n, n, dtype=torch.float64, device=x.device), s=(2 * n, 2 * n))
    pairs = torch.fft.irfft2(ones.conj() * ones, s=(2 * n, 2 * n))
    idx = torch.arange(-(n - 1), n, device=x.device) % (2 * n)  # lags −(N−1) .. N−1
    sums = sums[..., idx, :][..., idx]
    pairs = pairs[idx][:, idx].round()
    return sums, pairs


def _symmetrize(xi: Tensor) -> Tensor:
    """Average ξ_ab(Δ) [C, C, L, L] over the eight symmetries of the square (an isotropic field's statistics are
    invariant under them), then over a ↔ b (ξ_ab(−Δ) = ξ_ba(Δ) always, and isotropy makes ξ even in Δ)."""
    s = (xi + xi.flip(-1) + xi.flip(-2) + xi.flip(-1, -2)) / 4
    s = (s + s.transpose(-1, -2)) / 2
    return (s + s.transpose(0, 1)) / 2


class CropGaussian(DataInitialized):
    """The fitted exact Gaussian model of a stationary, isotropic field on a square crop (see the module docstring).

    Args:
        channels: channels C of the maps.
        size: side N of the square maps, in pixels.
        max_dims: the largest C·N² allowed (the dense factor is (C·N²)² numbers in float64).
    """

    def __init__(self, channels: int, size: int, max_dims: int = MAX_DIMS) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("size", size, minimum=2)
        dims = channels * size * size
        if dims > max_dims:
            raise ValueError(
                f"CropGaussian: channels × size² = {dims} exceeds max_dims = {max_dims}; use the stationary filter "
                "(stationary_dense=false) for maps this large"
            )
        self.channels, self.size = int(channels), int(size)
        lags = 2 * size - 1
        self.register_buffer("xi", torch.zeros(channels, channels, lags, lags, dtype=torch.float64))
        self._factor: tuple[Tensor, Tensor] | None = None  # (L, Σ log diag L), rebuilt from xi
        self._factor_key: tuple | None = None  # which xi the factor is of (storage, in-place version)

    # -- state ------------------------------------------------------------------------------------------------
    def covariance(self) -> Tensor:
        """The dense covariance [C·N², C·N²] (float64) of the flattened map (channel-major, then rows, columns)."""
        n, c = self.size, self.channels
        u = torch.arange(n, device=self.xi.device)
        du = (u[:, None] - u[None, :]) + n - 1  # [N, N] lag index of row i minus row j
        # cov[(a, i, k), (b, j, l)] = ξ_ab(x_j − x_i) in the convention of crop_correlation: Σ x_a(p) x_b(p + Δ)
        cov = self.xi[:, :, du.T][:, :, :, :, du.T]  # [C, C, Ni, Nj, Nk, Nl]
        cov = cov.permute(0, 2, 4, 1, 3, 5).reshape(c * n * n, c * n * n)
        return (cov + cov.T) / 2

    def _cholesky(self) -> tuple[Tensor, Tensor]:
        # keyed on xi's storage and in-place version: a load, a refit or a move to another device rebuilds it,
        # nothing else does (a 64² factor costs seconds, and samplers move modules between calls)
        key = (self.xi.device, self.xi.data_ptr(), self.xi._version)
        if self._factor is None or self._factor_key != key:
            cov = self.covariance()
            scale = cov.diagonal().mean()
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            for jitter in (1e-10, 1e-8, 1e-6, 1e-4):  # an estimated ξ is PSD only up to its noise
                lower, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
                if int(info) == 0:
                    break
            else:
                raise ValueError("CropGaussian: the fitted covariance is not positive definite; fit on more maps")
            self._factor = (lower, torch.log(lower.diagonal()).sum())
            self._factor_key = key
        return self._factor

    # -- the transform ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent: ``y = L⁻¹ x`` per map. Returns ``(y, logdet[B])``."""
        self._check(x)
        if not self.is_initialized:
            self.initialize(x)
        lower, logdiag = self._cholesky()
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        y = torch.linalg.solve_triangular(lower, flat.T, upper=False).T
        logdet = (-logdiag).to(acc_dtype(x)).expand(x.shape[0])
        return y.reshape(x.shape).to(x.dtype), logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        """Latent -> data: ``x = L y``."""
        self._check(y)
        lower, _ = self._cholesky()
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        return (flat @ lower.T).reshape(y.shape).to(y.dtype)

    def _check(self, x: Tensor) -> None:
        want = (self.channels, self.size, self.size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")

    # -- fitting ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, chunk: int = 512) -> None:
        """Fit ξ on maps ``x`` [B, C, N, N] (zero-mean); sums are all-reduced over processes when
        ``torch.distributed`` is initialised, so every rank fits the same layer."""
        self._check(x)
        sums = torch.zeros_like(self.xi)
        pairs = None
        for i in range(0, x.shape[0], chunk):
            s, pairs = crop_correlation(x[i : i + chunk].detach().to(self.xi.device))
            sums += s
        stats = torch.cat([sums.flatten(), torch.tensor([float(x.shape[0])], dtype=torch.float64, device=sums.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        xi = stats[:-1].view_as(sums) / (stats[-1] * pairs)
        self.xi.copy_(_symmetrize(xi))
        self._mark_initialized()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"
