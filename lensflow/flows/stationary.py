"""Stationary Gaussian layer: a learned, rotation-invariant whitening filter in an orthonormal Fourier basis.

After Dai & Seljak's translation- and rotation-equivariant flows (TRENF, 2022): the Gaussian part of a
cosmological field is a stationary, isotropic covariance, which is diagonal in Fourier space. This layer
transforms each map to an orthonormal real Fourier basis, multiplies every mode by a learned ``C x C``
lower-triangular matrix that depends only on the mode's radius |k| (so cross-channel correlations of
tomographic bins are fitted too), and transforms back. It is data-initialised to whiten the training maps'
power spectrum exactly (per radial knot), so the multi-scale Glow behind it starts from the Gaussian model
with the measured C_ℓ and only has to learn the non-Gaussian rest.

Bases (both orthonormal real N x N matrices applied on each axis, so the transform's log-det is only the
filter's): *periodic* maps use the separable discrete Hartley basis ``cas(2π k n / N) / √N``, in which a
filter even in k_x and in k_y is exactly a circular convolution; *non-periodic* maps use the orthonormal
DCT-II, whose symmetric boundary extension avoids the wrap-around correlation a periodic filter would put
between opposite edges of a crop (the DCT nearly diagonalises the Toeplitz covariance of a crop, the DFT
exactly diagonalises the circulant one of a tile).

Filter: log-diagonal and off-diagonal entries are learned at ``knots`` radii log-spaced between the
smallest and largest nonzero |k| (plus one for k = 0) and interpolated linearly in log |k|. With
``cond_dim`` a zero-initialised linear map of ``cond`` adds to every knot, so the spectrum can follow the
cosmology. ``forward(x, cond) -> (y, logdet[B])``, ``inverse(y, cond) -> x``.

Low modes: a diagonal filter in the DCT basis is the exact Gaussian model of a field with reflecting boundaries,
not of a crop. The two differ where the crop's edges matter most, at the lowest modes: on 64² crops of the kappa
field the mean mode and the (0, 2) mode correlate at −0.30, which a diagonal filter (and a Glow behind it, whose
top prior is independent per top-level pixel) misses; mocks then had 7 % too little scatter in the mean of the map's
interior, and validate at 4,000 maps failed on it. So the ``low_modes`` × ``low_modes`` block of lowest modes (all
channels) is further multiplied by one dense lower-triangular matrix, data-initialised to whiten that block's
covariance after the diagonal filter: the exact Gaussian model of the large scales. That matrix is a fitted
buffer (like the preprocessing statistics), not a trained parameter, so fit the layer on many maps
(:meth:`lensflow.flows.Glow.fit_preprocessing` uses the normalisation maps): a K = 8 block is 64-dimensional.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._util.log import get_logger
from ._common import DataInitialized, acc_dtype, check_cond, check_positive_int, stream_dtype

log = get_logger(__name__)


def _dct_basis(n: int) -> tuple[Tensor, Tensor]:
    """Orthonormal DCT-II matrix [n, n] (rows are modes) and each mode's angular frequency (rad/pixel)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m, math.pi * torch.arange(n, dtype=torch.float64) / n


def _hartley_basis(n: int) -> tuple[Tensor, Tensor]:
    """Orthonormal discrete Hartley matrix [n, n] (symmetric) and each mode's angular frequency (rad/pixel)."""
    k = torch.arange(n, dtype=torch.float64)
    arg = 2 * math.pi * k[:, None] * k[None, :] / n
    m = (torch.cos(arg) + torch.sin(arg)) / math.sqrt(n)
    return m, 2 * math.pi * torch.minimum(k, n - k) / n


class StationaryGaussian(DataInitialized):
    """Learned isotropic ``C x C`` whitening filter per Fourier mode (see the module docstring).

    Args:
        channels: map channels.
        size: map side in pixels.
        periodic: Hartley basis (periodic maps) instead of the DCT-II (crops).
        knots: radial knots of the filter (>= 2), plus one for k = 0.
        cond_dim: conditioning size (0: unconditional).
        low_modes: side K of the block of lowest modes whitened by one dense matrix (0: none; at most ``size``).
    """

    def __init__(
        self,
        channels: int,
        size: int,
        periodic: bool = False,
        knots: int = 24,
        cond_dim: int = 0,
        low_modes: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("size", size, minimum=2)
        check_positive_int("knots", knots, minimum=2)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        self.channels, self.size, self.periodic = channels, size, bool(periodic)
        self.knots, self.cond_dim = knots, cond_dim
        basis, freq = (_hartley_basis if periodic else _dct_basis)(size)
        radius = torch.hypot(freq[:, None], freq[None, :])  # [N, N]
        # Interpolation of the knot values to every mode: knot `knots` is k = 0, the rest log-spaced in |k|.
        pos = radius > 0
        lr = torch.log(radius[pos])
        grid = torch.linspace(float(lr.min()), float(lr.max()), knots, dtype=torch.float64)
        t = ((lr - grid[0]) / (grid[1] - grid[0])).clamp(0, knots - 1 - 1e-9)
        lo = torch.full(radius.shape, knots, dtype=torch.long)
        frac = torch.zeros(radius.shape, dtype=torch.float64)
        lo[pos] = t.floor().long()
        frac[pos] = t - t.floor()
        weights = torch.zeros(size, size, knots + 1, dtype=torch.float64)
        weights.scatter_(-1, lo[..., None], (1 - frac)[..., None])
        hi = torch.where(pos, lo + 1, lo).clamp_max(knots)
        weights.scatter_add_(-1, hi[..., None], torch.where(pos, frac, torch.zeros_like(frac))[..., None])
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("weights", weights, persistent=False)  # [N, N, K+1]: mode <- knots
        self.raw = nn.Parameter(torch.zeros(knots + 1, channels, channels))
        self.register_buffer("tril", torch.tril(torch.ones(channels, channels), -1), persistent=False)
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, (knots + 1) * channels * channels)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)
        check_positive_int("low_modes", low_modes, minimum=0)
        self.low_modes = min(int(low_modes), size)
        dims = channels * self.low_modes**2
        # A fixed, data-fitted buffer (strictly lower part + log-diagonal), not a parameter: it is the Gaussian MLE of
        # the block, and trained by SGD its (C·K²)²/2 entries over-fit (the kappa_quick KL gap grew 0.0007 -> 0.0011).
        self.register_buffer("low", torch.zeros(dims, dims) if dims else torch.zeros(0, 0))

    # -- the transform ----------------------------------------------------------------------------------------
    def _to_modes(self, x: Tensor) -> Tensor:
        b = self.basis.to(x.dtype)
        return b @ x @ b.T

    def _from_modes(self, m: Tensor) -> Tensor:
        b = self.basis.to(m.dtype)
        return b.T @ m @ b

    def _knots(self, cond: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        """Knot parameters [B or 1, K+1, C, C]."""
        raw = self.raw.to(dtype)[None]
        if self.cond_dim:
            cond = check_cond(cond, self.cond_dim, batch, "StationaryGaussian")
            shape = (batch, self.knots + 1, self.channels, self.channels)
            raw = raw + self.cond_proj(cond).to(dtype).view(shape)
        return raw

    def _filter(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Per-mode lower-triangular filters [B, N, N, C, C] and their log-diagonals summed over modes [B]."""
        w = self.weights.to(raw.dtype)
        per_mode = torch.einsum("uvk,bkij->buvij", w, raw)
        logdiag = torch.diagonal(per_mode, dim1=-2, dim2=-1)  # [B, N, N, C]
        lower = per_mode * self.tril.to(raw.dtype) + torch.diag_embed(logdiag.exp())
        return lower, logdiag.sum(dim=(1, 2, 3))

    def _diagonal(self, modes: Tensor, cond: Tensor | None, raw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The per-mode filter (of knots ``raw``, default from ``cond``) applied to modes [B, C, N, N]; returns the
        filtered modes and the log-det [B]."""
        lower, logdet = self._filter(self._knots(cond, modes.shape[0], modes.dtype) if raw is None else raw)
        if self.channels == 1:
            return modes * lower[..., 0, 0].unsqueeze(1), logdet
        return torch.einsum("buvij,bjuv->biuv", lower, modes), logdet

    def _low_matrix(self, dtype: torch.dtype) -> Tensor:
        low = self.low.to(dtype)
        return torch.tril(low, -1) + torch.diag(low.diagonal().exp())

    def _mix_low(self, modes: Tensor, inverse: bool = False) -> Tensor:
        """The dense whitening of the lowest ``low_modes``² modes (or its inverse) on modes [B, C, N, N]."""
        if not self.low_modes:
            return modes
        k = self.low_modes
        block = modes[:, :, :k, :k].reshape(modes.shape[0], -1)
        mat = self._low_matrix(modes.dtype)
        if inverse:
            block = torch.linalg.solve_triangular(mat, block.T, upper=False).T
        else:
            block = block @ mat.T
        out = modes.clone()
        out[:, :, :k, :k] = block.view(modes.shape[0], self.channels, k, k)
        return out

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent direction: ``y = B^T M_low(L(|k|) (B x B^T)) B``. Returns ``(y, logdet[B])``."""
        self._check(x)
        if not self.is_initialized:
            self.initialize(x)
        dt = stream_dtype(x)
        out, logdet = self._diagonal(self._to_modes(x.to(dt)), cond)
        out = self._mix_low(out)
        if self.low_modes:
            logdet = logdet + self.low.diagonal().to(logdet.dtype).sum()
        y = self._from_modes(out)
        return y.to(x.dtype), logdet.to(acc_dtype(x)).expand(x.shape[0])

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check(y)
        dt = stream_dtype(y)
        modes = self._mix_low(self._to_modes(y.to(dt)), inverse=True)
        lower, _ = self._filter(self._knots(cond, y.shape[0], dt))
        if self.channels == 1:
            out = modes / lower[..., 0, 0].unsqueeze(1)
        else:
            rhs = modes.permute(0, 2, 3, 1).unsqueeze(-1)  # [B, N, N, C, 1]
            out = torch.linalg.solve_triangular(lower.expand(rhs.shape[0], -1, -1, -1, -1), rhs, upper=False)
            out = out.squeeze(-1).permute(0, 3, 1, 2)
        return self._from_modes(out).to(y.dtype)

    def _check(self, x: Tensor) -> None:
        want = (self.channels, self.size, self.size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")

    # -- data-dependent initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Whiten ``x`` [B, C, N, N]: each knot's filter is the inverse Cholesky factor of the knot-weighted mode
        covariance; sums are all-reduced over processes when ``torch.distributed`` is initialised (as ActNorm)."""
        self._check(x)
        modes = self._to_modes(x.detach().to(torch.float64))  # [B, C, N, N]
        outer = torch.einsum("biuv,bjuv->uvij", modes, modes)  # [N, N, C, C], summed over maps
        w = self.weights.to(torch.float64)
        stats = torch.cat([torch.einsum("uvk,uvij->kij", w, outer).flatten(), (w.sum((0, 1)) * x.shape[0])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        k, c = self.knots + 1, self.channels
        count = stats[k * c * c :]
        cov = stats[: k * c * c].view(k, c, c) / count.clamp_min(1e-300).view(k, 1, 1)
        # A knot between the discrete radii of a small map touches no mode: give it its nearest used knot's value
        # (it does not enter the filter until training moves the knots, and then it starts sensible).
        used = torch.nonzero(count[:-1] > 1e-9 * count.max()).flatten()  # radial knots with modes
        nearest = used[(torch.arange(self.knots)[:, None] - used[None, :]).abs().argmin(dim=1)]
        cov = torch.cat([cov[nearest], cov[-1:]])  # the k = 0 knot always holds the mean mode
        cov = cov + 1e-9 * torch.eye(c, dtype=cov.dtype) * cov.diagonal(dim1=-2, dim2=-1).mean(-1).view(k, 1, 1)
        inv = torch.linalg.inv(torch.linalg.cholesky(cov))  # lower-triangular whitening per knot
        raw = inv * self.tril.to(inv.dtype) + torch.diag_embed(torch.log(torch.diagonal(inv, dim1=-2, dim2=-1)))
        self.raw.copy_(raw.to(self.raw.dtype))
        if self.low_modes:
            self._initialize_low(x)
        self._mark_initialized()

    def _initialize_low(self, x: Tensor) -> None:
        """Whiten the block of lowest modes after the (just initialised) diagonal filter, as :meth:`initialize`."""
        # the conditional part of the knots starts at zero, so the unconditional knots are the initial filter
        out, _ = self._diagonal(self._to_modes(x.detach().to(torch.float64)), None, self.raw.to(torch.float64)[None])
        k = self.low_modes
        block = out[:, :, :k, :k].reshape(x.shape[0], -1)
        stats = torch.cat([(block.T @ block).flatten(), torch.tensor([float(x.shape[0])], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        d = block.shape[1]
        if float(stats[-1]) < 4 * d:
            # a d-dimensional covariance from fewer than 4d maps whitens noise, not the field: keep the identity
            log.warning("StationaryGaussian: %d maps are too few to fit the %d-dim low-mode block; left at identity",
                        int(stats[-1]), d)  # fmt: skip
            self.low.zero_()
            return
        cov = stats[: d * d].view(d, d) / stats[-1]
        cov = cov + 1e-9 * torch.eye(d, dtype=cov.dtype) * cov.diagonal().mean()
        inv = torch.linalg.inv(torch.linalg.cholesky(cov))
        self.low.copy_((torch.tril(inv, -1) + torch.diag(torch.log(inv.diagonal()))).to(self.low.dtype))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, size={self.size}, basis={'hartley' if self.periodic else 'dct'}, "
            f"knots={self.knots}, cond_dim={self.cond_dim}, low_modes={self.low_modes}"
        )
