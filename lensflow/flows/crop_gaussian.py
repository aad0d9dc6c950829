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

**Conditional** (``cond_dim = P > 0``): ``ξ`` depends on the (normalised) parameters θ through a tensor-product
polynomial of degree ``degree`` in each parameter, ``ξ(Δ; θ) = Σ_k c_k(Δ) φ_k(θ)``, fitted by least squares on
every training map's lagged products at its own θ (any design: a grid, a Latin hypercube, a fresh θ per map). The
fit pools all maps, so ``ξ`` at a training node is no better known than between nodes, and the estimate is as
smooth in θ as the cosmology is. It needs at least ``(degree + 1)^P`` distinct θ.

Only ``ξ`` (or its coefficients ``c_k``) is stored, a buffer; each factor ``L`` (about 1 s and 134 MB for 64² in
float64) is built on first use and kept in a cache shared by every layer with the same ``ξ`` (a model and its EMA),
least recently used first out beyond ``cache_bytes``; it is never saved. The dense factor limits the layer to
``C·N² ≤ max_dims`` (default 8,192: a 64² map, or 2 channels of 64²); larger maps use the stationary filter.
``forward(x, cond) -> (y, logdet[B])``, ``inverse(y, cond) -> x``; ``x`` is zero-mean (the preprocessing centres it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import DataInitialized, acc_dtype, check_cond, check_positive_int, polynomial_basis

__all__ = ["CropGaussian", "crop_correlation", "polynomial_basis"]

MAX_DIMS = 8192
CACHE_BYTES = 8 * 2**30  # 60 factors of a 64² map: a 7 x 7 training grid and its EMA share one set

# (ξ fingerprint, device, θ bytes) -> (L, Σ log diag L); shared by all layers (a model and its EMA copy)
_FACTORS: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()


def crop_correlation(x: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sums of lagged products of maps ``x`` [B, C, N, N]: ``(sums [C, C, 2N−1, 2N−1], pairs [2N−1, 2N−1])``.

    ``sums[a, b, N−1+du, N−1+dv] = Σ_maps Σ_p x_a(p) x_b(p + Δ)``, Δ = (du, dv), over the pixel pairs inside the crop;
    ``pairs`` counts them per map. ``ξ_ab(Δ) = sums / (B · pairs)``. With ``weights`` [B, K] the sums are weighted per
    map and per column: ``sums [K, C, C, 2N−1, 2N−1] = Σ_maps w_mk (lagged products of map m)``.
    """
    b, c, n, _ = x.shape
    f = torch.fft.rfft2(x.to(torch.float64), s=(2 * n, 2 * n))  # zero padding: no wrap-around of lags
    if weights is None:
        prod = torch.einsum("baij,bcij->acij", f.conj(), f)
    else:
        prod = torch.einsum("bk,baij,bcij->kacij", weights.to(torch.complex128), f.conj(), f)
    sums = torch.fft.irfft2(prod, s=(2 * n, 2 * n))
    ones = torch.fft.rfft2(torch.ones(n, n, dtype=torch.float64, device=x.device), s=(2 * n, 2 * n))
    pairs = torch.fft.irfft2(ones.conj() * ones, s=(2 * n, 2 * n))
    idx = torch.arange(-(n - 1), n, device=x.device) % (2 * n)  # lags −(N−1) .. N−1
    sums = sums[..., idx, :][..., idx]
    pairs = pairs[idx][:, idx].round()
    return sums, pairs


def _symmetrize(xi: Tensor) -> Tensor:
    """Average ξ_ab(Δ) [..., C, C, L, L] over the eight symmetries of the square (an isotropic field's statistics
    are invariant under them), then over a ↔ b (ξ_ab(−Δ) = ξ_ba(Δ) always, and isotropy makes ξ even in Δ)."""
    s = (xi + xi.flip(-1) + xi.flip(-2) + xi.flip(-1, -2)) / 4
    s = (s + s.transpose(-1, -2)) / 2
    return (s + s.transpose(-3, -4)) / 2


def _factor_of(cov: Tensor) -> tuple[Tensor, Tensor]:
    scale = cov.diagonal().mean()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    for jitter in (1e-10, 1e-8, 1e-6, 1e-4):  # an estimated ξ is PSD only up to its noise
        lower, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if int(info) == 0:
            return lower, torch.log(lower.diagonal()).sum()
    raise ValueError("CropGaussian: the fitted covariance is not positive definite; fit on more maps")


class CropGaussian(DataInitialized):
    """The fitted exact Gaussian model of a stationary, isotropic field on a square crop (see the module docstring).

    Args:
        channels: channels C of the maps.
        size: side N of the square maps, in pixels.
        cond_dim: conditioning parameters P (0: one ξ).
        degree: polynomial degree of ξ in each normalised parameter (conditional layers only).
        max_dims: the largest C·N² allowed (the dense factor is (C·N²)² numbers in float64).
        cache_bytes: the most bytes of factors kept (shared by all layers).
    """

    def __init__(
        self,
        channels: int,
        size: int,
        cond_dim: int = 0,
        degree: int = 3,
        max_dims: int = MAX_DIMS,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("size", size, minimum=2)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        check_positive_int("degree", degree, minimum=0)
        dims = channels * size * size
        if dims > max_dims:
            raise ValueError(
                f"CropGaussian: channels × size² = {dims} exceeds max_dims = {max_dims}; use the stationary filter "
                "(stationary_dense=false) for maps this large"
            )
        self.channels, self.size, self.cond_dim, self.degree = int(channels), int(size), int(cond_dim), int(degree)
        self.cache_bytes = int(cache_bytes)
        lags = 2 * size - 1
        shape = (channels, channels, lags, lags)
        if cond_dim:
            shape = ((degree + 1) ** cond_dim, *shape)
        self.register_buffer("xi", torch.zeros(shape, dtype=torch.float64))
        self._fingerprint: tuple[tuple, str] | None = None  # (xi storage and version, hash of its values)

    # -- state ------------------------------------------------------------------------------------------------
    def correlation(self, cond: Tensor | None = None) -> Tensor:
        """ξ [C, C, 2N−1, 2N−1] (float64), at one normalised ``cond`` row [P] for a conditional layer."""
        if not self.cond_dim:
            return self.xi
        if cond is None or cond.numel() != self.cond_dim:
            raise ValueError(f"cond: this CropGaussian has cond_dim={self.cond_dim}; pass one row of {self.cond_dim}")
        phi = polynomial_basis(cond.reshape(1, -1).to(self.xi.device), self.degree)[0]
        return torch.tensordot(phi, self.xi, dims=1)

    def covariance(self, cond: Tensor | None = None) -> Tensor:
        """The dense covariance [C·N², C·N²] (float64) of the flattened map (channel-major, then rows, columns)."""
        n, c = self.size, self.channels
        xi = self.correlation(cond)
        u = torch.arange(n, device=xi.device)
        du = (u[:, None] - u[None, :]) + n - 1  # [N, N] lag index of row i minus row j
        # cov[(a, i, k), (b, j, l)] = ξ_ab(x_j − x_i) in the convention of crop_correlation: Σ x_a(p) x_b(p + Δ)
        cov = xi[:, :, du.T][:, :, :, :, du.T]  # [C, C, Ni, Nj, Nk, Nl]
        cov = cov.permute(0, 2, 4, 1, 3, 5).reshape(c * n * n, c * n * n)
        return (cov + cov.T) / 2

    def _xi_fingerprint(self) -> str:
        # hashed once per storage and in-place version: a load, a refit or a move rebuilds factors, nothing else
        # does, and a model and its EMA copy (equal ξ, separate storage) share them
        key = (self.xi.device, self.xi.data_ptr(), self.xi._version)
        if self._fingerprint is None or self._fingerprint[0] != key:
            digest = hashlib.sha1(self.xi.detach().cpu().numpy().tobytes()).hexdigest()
            self._fingerprint = (key, digest)
        return self._fingerprint[1]

    def _cholesky(self, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        row = b"" if cond is None else cond.detach().to("cpu", torch.float64).numpy().tobytes()
        key = (self._xi_fingerprint(), str(self.xi.device), self.size, self.channels, row)
        hit = _FACTORS.get(key)
        if hit is not None:
            _FACTORS.move_to_end(key)
            return hit
        factor = _factor_of(self.covariance(cond))
        _FACTORS[key] = factor
        per = factor[0].numel() * factor[0].element_size()
        while len(_FACTORS) > 1 and len(_FACTORS) * per > self.cache_bytes:
            _FACTORS.popitem(last=False)
        return factor

    def _groups(self, cond: Tensor | None, batch: int):
        """(rows of the batch, factor) per distinct condition."""
        cond = check_cond(cond, self.cond_dim, batch, "CropGaussian")
        if cond is None:
            yield slice(None), self._cholesky()
            return
        uniq, inv = torch.unique(cond.detach(), dim=0, return_inverse=True)
        for g in range(uniq.shape[0]):
            yield (inv == g).nonzero().squeeze(1), self._cholesky(uniq[g])

    # -- the transform ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent: ``y = L(θ)⁻¹ x`` per map. Returns ``(y, logdet[B])``."""
        self._check(x)
        if not self.is_initialized:
            self.initialize(x, cond)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        y = torch.empty_like(flat)
        logdet = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for rows, (lower, logdiag) in self._groups(cond, x.shape[0]):
            y[rows] = torch.linalg.solve_triangular(lower, flat[rows].T, upper=False).T
            logdet[rows] = -logdiag
        return y.reshape(x.shape).to(x.dtype), logdet.to(acc_dtype(x))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        """Latent -> data: ``x = L(θ) y``."""
        self._check(y)
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        x = torch.empty_like(flat)
        for rows, (lower, _) in self._groups(cond, y.shape[0]):
            x[rows] = flat[rows] @ lower.T
        return x.reshape(y.shape).to(y.dtype)

    def _check(self, x: Tensor) -> None:
        want = (self.channels, self.size, self.size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")

    # -- fitting ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, cond: Tensor | None = None, chunk: int = 256) -> None:
        """Fit ξ on maps ``x`` [B, C, N, N] (zero-mean), at their normalised conditions ``cond`` [B, P] for a
        conditional layer; sums are all-reduced over processes when ``torch.distributed`` is initialised, so every
        rank fits the same layer."""
        self._check(x)
        cond = check_cond(cond, self.cond_dim, x.shape[0], "CropGaussian")
        k = self.xi.shape[0] if self.cond_dim else 1
        sums = torch.zeros((k, *self.xi.shape[-4:]), dtype=torch.float64, device=self.xi.device)
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.xi.device)
        pairs = None
        for i in range(0, x.shape[0], chunk):
            part = x[i : i + chunk].detach().to(self.xi.device)
            if cond is None:
                phi = torch.ones(part.shape[0], 1, dtype=torch.float64, device=part.device)
            else:
                phi = polynomial_basis(cond[i : i + chunk].to(part.device), self.degree)
            s, pairs = crop_correlation(part, phi)
            sums += s
            gram += phi.T @ phi
        stats = torch.cat([sums.flatten(), gram.flatten()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        sums, gram = stats[: sums.numel()].view_as(sums) / pairs, stats[sums.numel() :].view_as(gram)
        if self.cond_dim:
            # least squares of every map's lagged products on the basis: gram · c = Σ φ ⊗ products
            if int(torch.linalg.matrix_rank(gram)) < k:
                raise ValueError(
                    f"CropGaussian: fitting ξ(θ) with degree {self.degree} in {self.cond_dim} parameters needs at "
                    f"least {k} distinct conditions spread over the box; lower model.stationary_degree or add maps"
                )
            coef = torch.linalg.solve(gram, sums.reshape(k, -1)).view_as(sums)
        else:
            coef = sums[0] / gram[0, 0]
        self.xi.copy_(_symmetrize(coef))
        self._mark_initialized()

    def extra_repr(self) -> str:
        extra = f", cond_dim={self.cond_dim}, degree={self.degree}" if self.cond_dim else ""
        return f"channels={self.channels}, size={self.size}{extra}"
