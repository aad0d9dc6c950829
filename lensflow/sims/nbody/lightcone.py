"""Lens planes of a periodic box and κ maps from them in the Born approximation.

Geometry (comoving Mpc/h, flat sky). The line of sight is cut into planes of thickness Δχ = L / n_cuts,
plane k spanning χ ∈ [kΔχ, (k+1)Δχ), out to the farthest source. Plane k is a slab of the box, of thickness Δχ,
projected along one of the three axes at the time a(χ_k) of its centre: Σ_k(x⊥) = ∫_slab δ dχ (Mpc/h). The
convergence of source distance χ_s is then (Born, e.g. Jain, Seljak & White 2000; Petri et al. 2016)

    κ(θ) = Σ_k W_k Σ_k(θ χ_k + s_k),   W_k = (3/2) Ω_cb (H₀/c)² (1/Δχ) ∫_slab χ (1 − χ/χ_s) / a(χ) dχ,

the slab's integral of the kernel taken exactly (so the planes' discreteness does not bias the mean C_ℓ), and
Ω_cb δ_cb standing for Ω_m δ_m (massive neutrinos are smooth on the scales of a box). An n(z) source bin gets
the n(z)-weighted mean of W_k. Each map draws, per plane, the projection axis (3), the slab (n_cuts), a
periodic shift s_k, and flips and a transpose of the plane (8 orientations); the planes are sampled bilinearly
at the pixel centres θ χ_k (the bilinear window is part of what this simulator makes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.sims.nbody.background import H0_OVER_C, Background
from lensflow.sims.theory import Source

__all__ = ["PlaneGeometry", "born_maps", "draw_orientations", "plane_geometry", "project_slabs"]


@dataclass(frozen=True)
class PlaneGeometry:
    """Where the lens planes lie and how much each weighs in each source bin."""

    thickness: float  # Δχ, Mpc/h
    chi: np.ndarray  # [K] plane centres, Mpc/h
    a: np.ndarray  # [K] scale factor at the centres (the time a plane is painted)
    weights: np.ndarray  # [C, K] W_k, (Mpc/h)⁻¹

    @property
    def n_planes(self) -> int:
        return int(self.chi.size)


def _chi_source(bg: Background, z: float) -> float:
    return float(bg.chi_of_a(1.0 / (1.0 + z)))


def _slab_weights(bg: Background, edges: np.ndarray, chi_s: float, thickness: float) -> np.ndarray:
    """W_k of one source plane at distance ``chi_s`` for slabs between ``edges`` (Gauss–Legendre per slab)."""
    x, w = np.polynomial.legendre.leggauss(24)
    out = np.zeros(edges.size - 1)
    for k in range(edges.size - 1):
        lo, hi = edges[k], min(edges[k + 1], chi_s)
        if hi <= lo:
            continue
        chi = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
        integrand = chi * (1.0 - chi / chi_s) / bg.a_of_chi(chi)
        out[k] = 0.5 * (hi - lo) * float(np.dot(w, integrand))
    return 1.5 * bg.omega_cb * H0_OVER_C**2 * out / thickness


def plane_geometry(bg: Background, sources: Sequence[Source], thickness: float) -> PlaneGeometry:
    """The planes of thickness ``thickness`` (Mpc/h) out to the farthest source, and their weights per bin."""
    from lensflow.sims.theory import source_zmax

    chi_max = max(_chi_source(bg, source_zmax(s)) for s in sources)
    n = max(1, math.ceil(chi_max / thickness - 1e-9))
    edges = thickness * np.arange(n + 1)
    rows = []
    for s in sources:
        if isinstance(s, float):
            rows.append(_slab_weights(bg, edges, _chi_source(bg, s), thickness))
            continue
        z, nz = s
        per_z = np.stack(
            [_slab_weights(bg, edges, _chi_source(bg, zi), thickness) if zi > 0 else np.zeros(n) for zi in z]
        )
        rows.append(np.trapezoid(nz[:, None] * per_z, z, axis=0) / np.trapezoid(nz, z))
    chi = 0.5 * (edges[1:] + edges[:-1])
    return PlaneGeometry(float(thickness), chi, np.asarray(bg.a_of_chi(chi)), np.stack(rows))


def project_slabs(rho: torch.Tensor, n_cuts: int, cell: float) -> torch.Tensor:
    """Σ = ∫_slab δ dχ (Mpc/h) [3, n_cuts, n, n] of a density ``rho`` = 1 + δ [n, n, n] of cell side ``cell``.

    Axis 0 of the result is the projection axis, axis 1 the slab along it.
    """
    n = rho.shape[0]
    m = n // n_cuts
    out = []
    for axis in range(3):
        slabs = rho.unflatten(axis, (n_cuts, m)).sum(axis + 1)  # [.., n_cuts, ..] with the cut at position axis
        out.append(slabs.movedim(axis, 0))
    return torch.stack(out) * cell - m * cell


def draw_orientations(rng: np.random.Generator, n_planes: int, n_cuts: int, n_mesh: int) -> np.ndarray:
    """Per plane: (axis, cut, shift_x, shift_y, flip_x, flip_y, transpose) as float64 [K, 7]; shifts in cells."""
    out = np.empty((n_planes, 7))
    out[:, 0] = rng.integers(0, 3, n_planes)
    out[:, 1] = rng.integers(0, n_cuts, n_planes)
    out[:, 2:4] = rng.uniform(0, n_mesh, (n_planes, 2))
    out[:, 4:7] = rng.integers(0, 2, (n_planes, 3))
    return out


def born_maps(
    planes: torch.Tensor,
    geometry: PlaneGeometry,
    orientations: np.ndarray,
    npix: int,
    pixel_rad: float,
    cell: float,
) -> torch.Tensor:
    """κ maps [B, C, npix, npix] (float32) from ``planes`` [K, 3, n_cuts, n, n] (Σ, Mpc/h).

    ``orientations`` [B, K, 7] are the draws of :func:`draw_orientations`; pixels of side ``pixel_rad``
    (radians) are centred on the field's axis; ``cell`` is the planes' cell side (Mpc/h).
    """
    K, _, n_cuts, n, _ = planes.shape
    B = orientations.shape[0]
    dev = planes.device
    flat = planes.reshape(K, 3 * n_cuts, n * n)
    theta = (torch.arange(npix, dtype=torch.float64, device=dev) - 0.5 * (npix - 1)) * pixel_rad
    o = torch.from_numpy(orientations).to(dev)
    w = torch.from_numpy(geometry.weights).to(dev, torch.float32)  # [C, K]
    out = torch.zeros(B, w.shape[0], npix, npix, dtype=torch.float32, device=dev)
    for k in range(K):
        ok = o[:, k]
        u = (theta * (geometry.chi[k] / cell))[None, :]  # [1, npix] cells from the axis
        sx, sy = ok[:, 2:3], ok[:, 3:4]
        ux = torch.where(ok[:, 4:5] > 0, -u, u) + sx  # [B, npix]
        uy = torch.where(ok[:, 5:6] > 0, -u, u) + sy
        # rows follow y, columns x; a transpose swaps the roles
        rows = uy[:, :, None].expand(B, npix, npix)
        cols = ux[:, None, :].expand(B, npix, npix)
        tr = (ok[:, 6] > 0)[:, None, None]
        r, c = torch.where(tr, cols, rows), torch.where(tr, rows, cols)
        r0, c0 = torch.floor(r), torch.floor(c)
        fr, fc = (r - r0).float(), (c - c0).float()
        r0 = r0.long() % n
        c0 = c0.long() % n
        r1, c1 = (r0 + 1) % n, (c0 + 1) % n
        sel = (ok[:, 0].long() * n_cuts + ok[:, 1].long())[:, None, None]
        src = flat[k]
        base = sel * (n * n)

        def at(ri: torch.Tensor, ci: torch.Tensor, src: torch.Tensor = src, base: torch.Tensor = base) -> torch.Tensor:
            return src.reshape(-1)[(base + ri * n + ci).reshape(-1)].view(B, npix, npix)

        val = (1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c1)) + fr * ((1 - fc) * at(r1, c0) + fc * at(r1, c1))
        out += w[:, k].view(1, -1, 1, 1) * val[:, None]
    return out
