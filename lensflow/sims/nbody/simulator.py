"""Flat-sky κ maps from particle-mesh N-body boxes: :class:`NBodySimulator`.

A *box* is one PM run (:mod:`lensflow.sims.nbody.ic`, :mod:`lensflow.sims.nbody.pm`): 2LPT initial conditions
at ``z_init`` from pyccl's linear P(k), ``n_steps`` FastPM kick-drift-kick steps to a = 1 on a force mesh
``mesh_factor`` times finer than the particle grid, and the lens planes (:mod:`lensflow.sims.nbody.lightcone`)
painted at their own times as the run passes them. Many
maps are drawn from the planes of one box, each with its own random projection axis, slab, shift and
orientation per plane (Jain, Seljak & White 2000; LensTools; Petri et al. 2016). Maps of one box share its
realization id in the map store, so train, validation and test never share a box.

Reproducibility: box b is drawn from ``SeedSequence([*seed, 0], spawn_key=(b,))`` and map i's plane draws from
``SeedSequence([*seed, 1], spawn_key=(i,))``, so a map depends only on the seed, its index and the spec; box
b's maps are indices ``[b·n/B, (b+1)·n/B)``. On a CPU the maps are the same bit for bit from run to run (the
numba CIC sums in a fixed order); a GPU gives the same statistics, not the same bits.

Resolution: the force mesh resolves k up to about half its Nyquist frequency, π/cell; at the lensing kernel's
peak χ_p that is ℓ ≈ k χ_p. :attr:`NBodySimulator.ell_resolved` gives this estimate; the measured agreement
with halofit is in ``docs/nbody.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lensflow._util.units import ARCMIN
from lensflow.sims.nbody.background import Background, background
from lensflow.sims.nbody.ic import initial_state
from lensflow.sims.nbody.lightcone import (
    PlaneGeometry,
    born_maps,
    draw_orientations,
    plane_geometry,
    project_slabs,
)
from lensflow.sims.nbody.mesh import paint
from lensflow.sims.nbody.pm import run, time_steps
from lensflow.sims.theory import ccl_cosmology, parse_sources, source_zmax

__all__ = ["NBodySimulator"]


def _seed_list(seed: int | Sequence[int]) -> list[int]:
    return [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


class NBodySimulator:
    """κ maps ``[n, C, npix, npix]`` from PM light cones (see the module docstring).

    Args:
        npix: map side in pixels.
        pixel_arcmin: pixel side, arcmin.
        cosmology: lensflow cosmology dict (:mod:`lensflow.sims.theory`).
        z_source: source plane(s) or n(z) bin(s), one channel each.
        box_size: side of the periodic box, Mpc/h.
        n_particles: particles per side (n³ in all).
        mesh_factor: force-mesh cells per particle per side (FastPM's B).
        n_steps: kick-drift-kick steps from ``z_init`` to today.
        z_init: redshift of the 2LPT initial conditions.
        n_cuts: slabs per box side; a lens plane is ``box_size / n_cuts`` thick.
        plane_mesh: cells per side of the lens planes (default: the force mesh).
        device: torch device of the PM run.

    Bad input raises ``ValueError`` with one line naming the argument, before anything is computed.
    """

    def __init__(
        self,
        npix: int,
        pixel_arcmin: float,
        cosmology: Mapping[str, Any],
        z_source: Any,
        *,
        box_size: float = 200.0,
        n_particles: int = 128,
        mesh_factor: int = 2,
        n_steps: int = 10,
        z_init: float = 9.0,
        n_cuts: int = 2,
        plane_mesh: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, v, lo in (("n_particles", n_particles, 2), ("n_steps", n_steps, 1), ("mesh_factor", mesh_factor, 1)):
            if isinstance(v, bool) or int(v) != v or v < lo:
                raise ValueError(f"sim.{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(n_cuts, bool) or int(n_cuts) != n_cuts or n_cuts < 1:
            raise ValueError(f"sim.n_cuts must be a positive integer, got {n_cuts!r}")
        for name, v in (("box_size", box_size), ("z_init", z_init), ("pixel_arcmin", pixel_arcmin)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"sim.{name} must be a positive number, got {v!r}")
        self.npix, self.pixel_arcmin = int(npix), float(pixel_arcmin)
        self.box_size, self.n_particles = float(box_size), int(n_particles)
        self.mesh_factor, self.n_steps, self.z_init = int(mesh_factor), int(n_steps), float(z_init)
        self.n_mesh = self.mesh_factor * self.n_particles
        self.n_cuts = int(n_cuts)
        self.plane_mesh = self.n_mesh if plane_mesh is None else int(plane_mesh)
        if self.plane_mesh < 2 or self.plane_mesh % self.n_cuts:
            raise ValueError(f"sim.plane_mesh ({self.plane_mesh}) must be a multiple of sim.n_cuts ({self.n_cuts})")
        self.device = torch.device(device)
        self.cosmology = dict(cosmology)
        self.sources = parse_sources(z_source)
        self.channels = len(self.sources)
        zmax = max(source_zmax(s) for s in self.sources)
        if zmax >= self.z_init:
            raise ValueError(
                f"z_source reaches z = {zmax:g}, beyond the light cone, which starts at sim.z_init = {self.z_init:g}"
            )
        self.bg: Background = background(self.cosmology, a_min=min(1e-3, 0.5 / (1 + self.z_init)))
        self.geometry: PlaneGeometry = plane_geometry(self.bg, self.sources, self.box_size / self.n_cuts)
        self._check_geometry()
        cc = ccl_cosmology(self.cosmology, nonlinear=False)
        self._ccl, self._h = cc, float(self.cosmology["h"])
        # P_cb = P_m / f_cb² on the scales a box holds (massive neutrinos do not cluster there)
        self._f_cb = self.bg.omega_cb / float(self.cosmology["Omega_m"])
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    # ------------------------------------------------------------------ checks and derived numbers
    @property
    def pixel_rad(self) -> float:
        return self.pixel_arcmin * ARCMIN

    @property
    def plane_cell(self) -> float:
        """Lens-plane cell side, Mpc/h."""
        return self.box_size / self.plane_mesh

    @property
    def ell_resolved(self) -> float:
        """ℓ ≈ k χ_p at half the force mesh's Nyquist k, χ_p the distance of the heaviest plane (an estimate)."""
        k_half = 0.5 * math.pi / (self.box_size / self.n_mesh)
        return k_half * float(self.geometry.chi[np.argmax(self.geometry.weights.max(0))])

    def _check_geometry(self) -> None:
        g = self.geometry
        used = np.flatnonzero(g.weights.max(0) > 0)
        far = float(g.chi[used[-1]])
        width = self.npix * self.pixel_rad * far
        if width > self.box_size:
            raise ValueError(
                f"sim.box_size = {self.box_size:g} Mpc/h is smaller than the field of view at the farthest lens plane "
                f"({width:.1f} Mpc/h at χ = {far:.0f} Mpc/h): the map would wrap onto itself; use a box of at "
                f"least {math.ceil(width)} Mpc/h or a smaller field"
            )
        # The pixels shrink towards the observer without limit, so the check is made at the peak of the lensing
        # kernel, where most of the signal comes from: nearer planes weigh less and are smoothed by the mesh.
        peak = int(np.argmax(g.weights.max(0)))
        near = float(g.chi[peak])
        pix = self.pixel_rad * near
        if self.plane_cell > pix:
            raise ValueError(
                f"sim.plane_mesh: the lens-plane mesh ({self.plane_cell:.2f} Mpc/h cells) is coarser than the map's "
                f"pixels ({pix:.2f} Mpc/h) at the peak of the lensing kernel (χ = {near:.0f} Mpc/h); use more "
                f"particles, a larger mesh_factor or plane_mesh, or larger pixels"
            )

    def power_today(self, k: np.ndarray) -> np.ndarray:
        """Linear P_cb(k) today, (Mpc/h)³, k in h/Mpc (pyccl's linear matter P(k) over f_cb²)."""
        import pyccl as ccl

        h = self._h
        return np.asarray(ccl.linear_matter_power(self._ccl, k * h, 1.0)) * h**3 / self._f_cb**2

    # ------------------------------------------------------------------ one box
    def initial_conditions(self, seed: int | Sequence[int], box: int) -> tuple[torch.Tensor, torch.Tensor]:
        """2LPT (x, p) [n³, 3] of box ``box`` at z_init, in force-mesh units."""
        ss = np.random.SeedSequence([*_seed_list(seed), 0], spawn_key=(int(box),))
        a0 = 1.0 / (1.0 + self.z_init)
        return initial_state(
            self.n_particles, self.box_size, self.bg, a0, self.power_today, ss, self.mesh_factor, self.device
        )

    def box_planes(
        self, seed: int | Sequence[int], box: int, progress: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """The lens planes Σ (Mpc/h) [K, 3, n_cuts, plane_mesh, plane_mesh] of box ``box`` (cached: the last one)."""
        key = (*_seed_list(seed), int(box))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        x, p = self.initial_conditions(seed, box)
        g = self.geometry
        K, n = g.n_planes, self.plane_mesh
        planes = torch.zeros(K, 3, self.n_cuts, n, n, dtype=torch.float32, device=self.device)
        to_plane = n / self.n_mesh
        mass = float(n**3) / x.shape[0]
        bg = self.bg

        def on_drift(xi: torch.Tensor, ph: torch.Tensor, ai: float, ac: float, af: float) -> None:
            for k in np.flatnonzero((g.a > ai) & (g.a <= af)):
                xk = torch.remainder(xi + bg.drift_factor(ai, ac, float(g.a[k])) * ph, float(self.n_mesh))
                rho = paint(xk * to_plane, n, mass)
                planes[k] = project_slabs(rho, self.n_cuts, self.plane_cell)

        steps = time_steps(1.0 / (1.0 + self.z_init), 1.0, self.n_steps)
        if g.a.min() <= steps[0]:  # pragma: no cover - excluded by the z_init check
            raise ValueError("a lens plane lies before the start of the simulation")
        run(x, p, bg, steps, self.n_mesh, on_drift=on_drift, progress=progress)
        self._cache = (key, planes)
        return planes

    # ------------------------------------------------------------------ maps
    def orientations(self, seed: int | Sequence[int], indices: Sequence[int]) -> np.ndarray:
        """The per-plane draws [len(indices), K, 7] of maps ``indices``
        (see :func:`lensflow.sims.nbody.lightcone.draw_orientations`)."""
        out = []
        for i in indices:
            ss = np.random.SeedSequence([*_seed_list(seed), 1], spawn_key=(int(i),))
            rng = np.random.Generator(np.random.PCG64(ss))
            out.append(draw_orientations(rng, self.geometry.n_planes, self.n_cuts, self.plane_mesh))
        return np.stack(out)

    def maps(self, planes: torch.Tensor, seed: int | Sequence[int], indices: Sequence[int]) -> np.ndarray:
        """κ maps float32 [len(indices), C, npix, npix] of map ``indices`` drawn from ``planes``."""
        o = self.orientations(seed, indices)
        out = born_maps(planes, self.geometry, o, self.npix, self.pixel_rad, self.plane_cell)
        return out.cpu().numpy()

    @staticmethod
    def box_of(index: int, n_maps: int, n_boxes: int) -> int:
        """The box that map ``index`` of ``n_maps`` comes from (contiguous runs of maps per box)."""
        return int(index) * int(n_boxes) // int(n_maps)

    def box_range(self, box: int, n_maps: int, n_boxes: int) -> range:
        """The map indices of box ``box``."""
        lo = -(-int(box) * int(n_maps) // int(n_boxes))
        hi = -(-(int(box) + 1) * int(n_maps) // int(n_boxes))
        return range(lo, hi)
