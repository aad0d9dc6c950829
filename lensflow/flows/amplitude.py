"""Joint amplitudes of a Glow's whitened latents: one radius per level, coupled across levels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_cond, check_positive_int, no_autocast

__all__ = ["LatentAmplitude"]


class LatentAmplitude(nn.Module):
    """Rescale each latent ``z_l`` (one per level, whitened) by a factor set by the radii ``|z_m|`` of all levels.

    Under a Glow's prior the latents of its levels are independent standard normals, so their radii are independent
    χ variables whose spread shrinks as 1/√D. A map's scales are not independent in that way when its content varies
    as a whole: an N-body map with more halos, or from a box with more large-scale power, has more power at every
    scale (its C_ℓ bins are correlated, and its variance, skewness and kurtosis move together), and a Glow trained on
    such maps leaves its latents' radii over-dispersed and correlated across levels, which its mocks then lack.

    With ``u_l = log|z_l|`` standardised to ``v_l = (u_l − E u_l) / sd(u_l)`` (the exact mean and standard deviation of
    the log of a χ variable with ``D_l`` degrees of freedom), the layer maps ``v' = M v + b`` with ``M`` lower
    triangular with a positive diagonal (and ``b`` plus ``Linear(cond)`` when conditional), then sets
    ``z'_l = z_l · exp(u'_l − u_l)``: every latent keeps its direction, and only the vector of radii moves. It is a
    bijection with ``log|det ∂z'/∂z| = Σ_l D_l (u'_l − u_l) + Σ_l log M_ll`` (polar coordinates per level), so the
    likelihood stays exact. All parameters start at zero (the identity) and enter multiplied by ``gain`` so that a
    few hundred optimiser steps reach O(1) couplings (as openai/glow's ``logscale_factor``). The radii are computed
    in float64.

    ``forward(zs, cond) -> (zs', logdet[B])`` (latent direction) and ``inverse(zs', cond) -> zs``; ``zs`` is a list of
    ``[B, ...]`` tensors with ``dims[l]`` elements per map each.
    """

    def __init__(self, dims: Sequence[int], cond_dim: int = 0, gain: float = 5.0) -> None:
        super().__init__()
        if len(dims) < 1:
            raise ValueError("dims: give the size of at least one latent")
        self.dims = tuple(check_positive_int("dims", int(d), minimum=2) for d in dims)
        self.cond_dim = check_positive_int("cond_dim", cond_dim, minimum=0)
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain!r}")
        self.gain = float(gain)
        n = len(self.dims)
        self.shift = nn.Parameter(torch.zeros(n))
        self.log_diag = nn.Parameter(torch.zeros(n))
        self.lower = nn.Parameter(torch.zeros(n * (n - 1) // 2))  # M's strictly lower triangle, row by row
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, n)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def _chi_log_moments(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(D, mean, sd)`` per latent (float64): ``log|z|`` of a ``D``-dimensional standard normal has mean
        ``(ψ(D/2) + log 2) / 2`` and standard deviation ``sqrt(ψ'(D/2)) / 2`` (computed on each call: no dtype cast of
        the module alters them)."""
        d = torch.tensor(self.dims, dtype=torch.float64, device=device)
        return d, (torch.special.digamma(d / 2) + math.log(2.0)) / 2, torch.special.polygamma(1, d / 2).sqrt() / 2

    def _matrix(self) -> Tensor:
        n = len(self.dims)
        m = torch.diag(torch.exp(self.log_diag.to(torch.float64) * self.gain))
        rows, cols = torch.tril_indices(n, n, offset=-1, device=m.device)
        return m.index_put((rows, cols), self.lower.to(torch.float64) * self.gain)

    def _offset(self, cond: Tensor | None, batch: int) -> Tensor:
        b = (self.shift * self.gain).to(torch.float64).expand(batch, -1)
        if self.cond_dim:
            b = b + self.cond_proj(cond).to(torch.float64)
        return b

    def _log_radii(self, zs: Sequence[Tensor]) -> Tensor:
        if len(zs) != len(self.dims):
            raise ValueError(f"zs must be a list of {len(self.dims)} tensors (one per level)")
        cols = []
        for z, d in zip(zs, self.dims, strict=True):
            if z[0].numel() != d:
                raise ValueError(f"each map's latent must have {d} elements, got {z[0].numel()}")
            sq = z.to(torch.float64).pow(2).flatten(1).sum(1)
            cols.append(0.5 * torch.log(sq.clamp_min(1e-300)))  # a latent of exact zeros has no direction to keep
        return torch.stack(cols, dim=1)

    def _rescale(self, zs: Sequence[Tensor], du: Tensor) -> list[Tensor]:
        out = []
        for i, z in enumerate(zs):
            f = torch.exp(du[:, i]).to(z.dtype)
            out.append(z * f.view(-1, *([1] * (z.dim() - 1))))
        return out

    def forward(self, zs: Sequence[Tensor], cond: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Latent direction: ``(zs', logdet[B])``, log-det in nats."""
        cond = check_cond(cond, self.cond_dim, zs[0].shape[0], "LatentAmplitude")
        with no_autocast(zs[0]):
            u = self._log_radii(zs)
            m = self._matrix()
            d, centre, spread = self._chi_log_moments(u.device)
            v = (u - centre) / spread
            u_new = centre + (v @ m.T + self._offset(cond, u.shape[0])) * spread
            du = u_new - u
            logdet = (du * d).sum(1) + self.log_diag.to(torch.float64).sum() * self.gain  # Σ log M_ll
        return self._rescale(zs, du), logdet.to(acc_dtype(zs[0]))

    def inverse(self, zs: Sequence[Tensor], cond: Tensor | None = None) -> list[Tensor]:
        cond = check_cond(cond, self.cond_dim, zs[0].shape[0], "LatentAmplitude")
        with no_autocast(zs[0]):
            u_new = self._log_radii(zs)
            m = self._matrix()
            _, centre, spread = self._chi_log_moments(u_new.device)
            rhs = (u_new - centre) / spread - self._offset(cond, u_new.shape[0])
            v = torch.linalg.solve_triangular(m, rhs.T, upper=False).T
            u = centre + v * spread
        return self._rescale(zs, u - u_new)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, cond_dim={self.cond_dim}, gain={self.gain}"
