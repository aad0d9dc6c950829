"""Full-sky convergence maps: GLASS lognormal matter shells + multi-plane Born lensing on HEALPix.

Full-sky backend
----------------
The light cone up to the farthest source is cut into top-hat matter shells of (at most) ``shell_dx``
comoving Mpc; every source-plane redshift is a shell edge. The angular power spectrum of the matter
density contrast in each shell comes from pyccl (halofit non-linear P(k), Limber unless ``l_limber``
asks for pyccl's FKEM non-Limber integration at low ℓ). GLASS (Tessore et al. 2023) turns these into
lognormal (δ >= -shift, default -1) or Gaussian HEALPix shells, band-limited to ``lmax`` and drawn
shell by shell so that only one shell is in memory. As for the flat-sky maps, pixel values are the
band-limited field at the pixel centres (no pixel window) unless ``pixwin=True``, which applies the
HEALPix pixel window (healpy then needs its pixel-window data files, fetched on first use).

The convergence of source bin c is the Born sum over shells κ_c = Σ_i w_ci δ_i with
w_ci = ∫_shell i dχ q_c(χ), the lensing efficiency q_c(χ) = (3/2) Ω_m (H0/c)² (1+z) χ ∫ dχ_s p_c(χ_s)
(χ_s - χ)/χ_s (a delta function p for a source plane). This is the thin-shell discretisation of the
same Limber/Born integral that :func:`lensflow.sims.theory.convergence_cl` evaluates; its expected
spectrum is :meth:`FullSkySimulator.theory_cl`.

The patches are cut by :func:`lensflow.sims.patches.cut_patches` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lensflow._util.seeds import map_rng
from lensflow.sims.patches import Patches, cut_patches, patch_centers, patch_directions
from lensflow.sims.theory import ccl_cosmology, parse_sources, source_labels, source_zmax

_C_KM_S = 299792.458
KINDS: tuple[str, ...] = ("gaussian", "lognormal")

# the patch cutter moved to lensflow.sims.patches; these names stay importable from here
__all__ = ["KINDS", "FullSkySimulator", "Patches", "born_weights", "cut_patches", "patch_centers", "patch_directions"]


# --------------------------------------------------------------------------------------------
# Full-sky simulation
# --------------------------------------------------------------------------------------------


def _shell_edges(cosmo: Any, sources: Sequence[Any], shell_dx: float) -> np.ndarray:
    """Redshift edges of shells of at most ``shell_dx`` Mpc, with every source plane as an edge."""
    import pyccl as ccl

    zmax = max(source_zmax(s) for s in sources)
    knots = sorted({0.0, zmax, *[s for s in sources if isinstance(s, float)]})
    chi_knots = ccl.comoving_radial_distance(cosmo, 1.0 / (1.0 + np.asarray(knots)))
    chis = [0.0]
    for a, b in zip(chi_knots[:-1], chi_knots[1:], strict=True):
        n = max(1, int(math.ceil((b - a) / shell_dx - 1e-9)))
        chis.extend(np.linspace(a, b, n + 1)[1:].tolist())
    chis = np.asarray(chis)
    z = np.zeros_like(chis)
    z[1:] = 1.0 / ccl.scale_factor_of_chi(cosmo, chis[1:]) - 1.0
    z[np.searchsorted(chis, chi_knots)] = knots  # exact source redshifts at the knots
    return z


def _cumtrapz(f: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(x))])


def born_weights(cosmo: Any, sources: Sequence[Any], z_edges: np.ndarray, n_sub: int = 64) -> np.ndarray:
    """Lensing weights w [C, S] of top-hat shells between ``z_edges`` for each source bin (see module docstring)."""
    import pyccl as ccl

    h = cosmo["h"]
    pref = 1.5 * cosmo["Omega_m"] * (h * 100.0 / _C_KM_S) ** 2  # 1/Mpc^2
    S = z_edges.size - 1
    chi_edges = np.concatenate([[0.0], ccl.comoving_radial_distance(cosmo, 1.0 / (1.0 + z_edges[1:]))])
    t = np.linspace(0.0, 1.0, n_sub)
    chi = chi_edges[:-1, None] + (chi_edges[1:] - chi_edges[:-1])[:, None] * t  # [S, n_sub]
    z = np.zeros_like(chi)
    pos = chi > 0
    z[pos] = 1.0 / ccl.scale_factor_of_chi(cosmo, chi[pos]) - 1.0
    out = np.zeros((len(sources), S))
    for c, s in enumerate(sources):
        if isinstance(s, float):
            chi_s = float(ccl.comoving_radial_distance(cosmo, 1.0 / (1.0 + s)))
            eff = np.clip(1.0 - chi / chi_s, 0.0, None)
        else:
            zs, nz = s
            zf = np.linspace(zs[0], zs[-1], max(2048, 4 * zs.size))
            pf = np.interp(zf, zs, nz)
            pf /= np.trapezoid(pf, zf)
            chif = ccl.comoving_radial_distance(cosmo, 1.0 / (1.0 + zf))
            # ∫_{χ'>χ} p (1 - χ/χ') dz' = A(χ) - χ B(χ), with tail integrals A = ∫p, B = ∫p/χ'
            inv = np.where(chif > 0, 1.0 / np.maximum(chif, 1e-30), 0.0)
            A_c, B_c = _cumtrapz(pf, zf), _cumtrapz(pf * inv, zf)
            A_tail = A_c[-1] - np.interp(chi, chif, A_c, left=0.0, right=A_c[-1])
            B_tail = B_c[-1] - np.interp(chi, chif, B_c, left=0.0, right=B_c[-1])
            eff = np.clip(A_tail - chi * B_tail, 0.0, None)
        q = pref * chi * (1.0 + z) * eff
        out[c] = np.trapezoid(q, chi, axis=1)
    return out


class FullSkySimulator:
    """Full-sky κ maps from GLASS matter shells and multi-plane Born lensing (see module docstring).

    Args:
        nside: HEALPix resolution of the shells and κ maps.
        cosmology: cosmology dict (see :mod:`lensflow.sims.theory`).
        z_source: source plane(s) / n(z) bin(s); one κ map each.
        kind: ``"lognormal"`` (matter shells δ >= -shift) or ``"gaussian"``.
        lmax: band limit of the shells; default ``3 nside - 1``.
        shell_dx: largest shell thickness in comoving Mpc.
        shift: lognormal shift of the matter shells (default 1: δ >= -1).
        ncorr: neighbouring shells correlated with each other when non-Limber spectra are used.
        l_limber: non-Limber (pyccl FKEM) shell spectra below this ℓ; -1 = Limber everywhere, where
            disjoint top-hat shells are uncorrelated.
        pixwin: apply the HEALPix pixel window to the shells (maps are pixel averages); needs healpy's
            pixel-window data files. Default: no window (band-limited field at pixel centres).
        nonlinear: halofit (default) or linear matter power.
    """

    def __init__(
        self,
        nside: int,
        cosmology: Mapping[str, Any],
        z_source: Any = 1.0,
        *,
        kind: str = "lognormal",
        lmax: int | None = None,
        shell_dx: float = 150.0,
        shift: float | None = None,
        ncorr: int = 3,
        l_limber: int = -1,
        pixwin: bool = False,
        nonlinear: bool = True,
    ) -> None:
        import glass
        import healpy as hp
        import pyccl as ccl

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if int(nside) != nside or nside < 1 or (int(nside) & (int(nside) - 1)):
            raise ValueError(f"nside must be a power of 2, got {nside!r}")
        if not shell_dx > 0:
            raise ValueError(f"shell_dx must be positive (Mpc), got {shell_dx!r}")
        self.nside = int(nside)
        self.lmax = 3 * self.nside - 1 if lmax is None else int(lmax)
        if self.lmax < 2:
            raise ValueError(f"lmax must be >= 2, got {lmax!r}")
        self.kind = kind
        self.sources = parse_sources(z_source)
        self.source_redshifts = source_labels(self.sources)
        self.channels = len(self.sources)
        self.shift = 1.0 if shift is None else float(shift)
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {shift!r}")
        cosmo = ccl_cosmology(cosmology, nonlinear)
        self._cosmo = cosmo
        self.z_edges = _shell_edges(cosmo, self.sources, float(shell_dx))
        self.shells = glass.tophat_windows(self.z_edges, dz=1e-3)
        self.weights = born_weights(cosmo, self.sources, self.z_edges)  # [C, S]
        S = len(self.shells)
        limber = l_limber is None or l_limber < 0
        self.ncorr = 0 if limber else max(0, min(int(ncorr), S - 1))

        ell = np.arange(self.lmax + 1, dtype=float)
        samples = (
            ell[1:]
            if self.lmax <= 3000
            else np.unique(np.concatenate([np.arange(1, 200), np.geomspace(200, self.lmax, 600).round()]))
        )
        tracers = [
            ccl.NumberCountsTracer(cosmo, has_rsd=False, dndz=(w.za, w.wa), bias=(w.za, np.ones_like(w.za)))
            for w in self.shells
        ]

        def shell_cl(i: int, j: int) -> np.ndarray:
            c = ccl.angular_cl(cosmo, tracers[i], tracers[j], samples, l_limber=l_limber)
            full = np.zeros(self.lmax + 1)
            full[1:] = np.interp(ell[1:], samples, c)  # exact when samples are all integers
            return full  # monopole 0: GLASS then fixes the Gaussian monopole to 0

        cls: list[np.ndarray] = []
        for i in range(S):
            for j in range(i, -1, -1):  # GLASS order: (0,0), (1,1), (1,0), (2,2), (2,1), (2,0), ...
                cls.append(shell_cl(i, j) if i - j <= self.ncorr else np.zeros(0))
        self.pixwin = bool(pixwin)
        cls = glass.discretized_cls(cls, nside=self.nside if pixwin else None, lmax=self.lmax, ncorr=self.ncorr)
        self.shell_cls = cls
        if kind == "lognormal":
            self.fields = glass.lognormal_fields(self.shells, shift=lambda _z: self.shift)
            self.gls = glass.solve_gaussian_spectra(self.fields, cls)
        else:
            self.fields = glass.gaussian_fields(self.shells)
            self.gls = cls
        self._npix_hp = hp.nside2npix(self.nside)

    @property
    def n_shells(self) -> int:
        return len(self.shells)

    def theory_cl(self) -> np.ndarray:
        """Expected κ spectra [C, C, lmax+1] of the maps: Σ_ij w_ci w_dj C_ij^shell (with the pixel window if used)."""
        S = self.n_shells
        out = np.zeros((self.channels, self.channels, self.lmax + 1))
        k = 0
        for i in range(S):
            for j in range(i, -1, -1):
                cl = self.shell_cls[k]
                k += 1
                if cl.shape[0] == 0:
                    continue
                n = min(cl.shape[0], self.lmax + 1)
                term = np.outer(self.weights[:, i], self.weights[:, j])[..., None] * cl[:n]
                out[..., :n] += term if i == j else term + np.swapaxes(term, 0, 1)
        return out

    def realization(self, seed: int | Sequence[int] = 0, index: int = 0) -> np.ndarray:
        """One full-sky realization: κ maps float64 [C, 12 nside²] (RING).

        Drawn from ``SeedSequence(seed, spawn_key=(index,))``: realization ``index`` depends only on the seed.
        """
        import glass

        rng = map_rng(seed, index)
        kappa = np.zeros((self.channels, self._npix_hp))
        for i, delta in enumerate(glass.generate(self.fields, self.gls, self.nside, ncorr=self.ncorr, rng=rng)):
            w = self.weights[:, i]
            if np.any(w != 0):
                kappa += w[:, None] * np.asarray(delta)[None]
        return kappa

    def patches(
        self,
        n: int,
        npix: int,
        pixel_arcmin: float,
        *,
        seed: int | Sequence[int] = 0,
        start: int = 0,
        interpolation: str = "bilinear",
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Yield (patches float32 [P, C, N, N], realization index) until ``n`` patches were produced.

        Full-sky realizations ``start, start+1, ...`` are drawn in turn; the last one may be used in part.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        centers = patch_centers(npix, pixel_arcmin)
        if centers[0].size == 0:
            raise ValueError(f"no {npix}x{npix} patch of {pixel_arcmin} arcmin fits on the sphere")
        done, r = 0, int(start)
        while done < n:
            kappa = self.realization(seed, r)
            p = cut_patches(
                kappa,
                npix,
                pixel_arcmin,
                centers=centers,
                interpolation=interpolation,
                max_patches=n - done,
                name=f"full-sky realization {r}",
            )
            done += p.maps.shape[0]
            yield p.maps, r
            r += 1
