"""Full-sky convergence maps (GLASS lognormal matter shells + multi-plane Born) and a gnomonic patch cutter.

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

Patch cutter
------------
:func:`cut_patches` takes square ``npix x npix`` patches with pixel side ``pixel_arcmin`` from any
HEALPix map by gnomonic (tangent-plane, FITS ``TAN``) projection about each patch centre. Pixel (i, j)
(row i, column j) sits at tangent-plane offsets x = -(j - (N-1)/2) Δ (east), y = (i - (N-1)/2) Δ
(north): the standard sky orientation, north up and east left, i.e. a FITS header with
``CDELT1 = -Δ``, ``CDELT2 = +Δ`` and ``CRPIX = (N+1)/2`` describes a patch exactly (see
:func:`lensflow.fitsio.fits_header`). Pixel values are bilinear interpolations of the HEALPix map at
the pixel centres (or nearest HEALPix pixel).

Patch centres (:func:`patch_centers`) are laid out in latitude bands: each band's latitude interval
contains every footprint of its patches and bands do not overlap in latitude; within a band, patches
are spaced by at least their longitude extent. Footprints (the full squares out to the pixel edges)
therefore never overlap, so patches are independent up to the map's own correlations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lensflow._util.seeds import map_rng
from lensflow._util.units import ARCMIN
from lensflow.sims.theory import ccl_cosmology, parse_sources, source_labels, source_zmax

_C_KM_S = 299792.458
KINDS: tuple[str, ...] = ("gaussian", "lognormal")


# --------------------------------------------------------------------------------------------
# Gnomonic geometry
# --------------------------------------------------------------------------------------------


def _basis(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial, east and north unit vectors [..., 3] at (lon, lat) in radians."""
    cl, sl = np.cos(lon), np.sin(lon)
    cb, sb = np.cos(lat), np.sin(lat)
    e_r = np.stack([cb * cl, cb * sl, sb], axis=-1)
    e_e = np.stack([-sl, cl, np.zeros_like(sl)], axis=-1)
    e_n = np.stack([-sb * cl, -sb * sl, cb], axis=-1)
    return e_r, e_e, e_n


def _tangent_to_vec(lon: np.ndarray, lat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit vectors of tangent-plane points (x east, y north, radians at the centre) about (lon, lat)."""
    e_r, e_e, e_n = _basis(np.asarray(lon, float), np.asarray(lat, float))
    v = e_r[..., None, :] + x[..., None] * e_e[..., None, :] + y[..., None] * e_n[..., None, :]
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def patch_directions(
    lon_deg: np.ndarray | float, lat_deg: np.ndarray | float, npix: int, pixel_arcmin: float
) -> np.ndarray:
    """Unit vectors [P, N, N, 3] of the pixel centres of gnomonic patches centred at (lon, lat) in degrees."""
    lon = np.radians(np.atleast_1d(np.asarray(lon_deg, float)))
    lat = np.radians(np.atleast_1d(np.asarray(lat_deg, float)))
    t = (np.arange(npix) - (npix - 1) / 2.0) * pixel_arcmin * ARCMIN
    # rows go north, columns go west (x = -t): FITS sky orientation
    y, x = np.meshgrid(t, -t, indexing="ij")
    v = _tangent_to_vec(lon[:, None], lat[:, None], x.reshape(1, -1), y.reshape(1, -1))
    return v.reshape(lon.size, npix, npix, 3)


def _footprint_extent(lat_c: float, h: float, k: int = 512) -> tuple[float, float, float]:
    """(min lat, max lat, max |Δlon|) in radians of the square [-h, h]² (tangent plane) about (0, lat_c).

    Latitude and longitude have no extremum inside a region that contains no pole, so the boundary,
    sampled finely, gives them (the sampling error, ~(2h/k)², is far below the layout margin).
    """
    s = np.linspace(-h, h, k)
    edge = np.concatenate(
        [np.c_[s, np.full(k, -h)], np.c_[s, np.full(k, h)], np.c_[np.full(k, -h), s], np.c_[np.full(k, h), s]]
    )
    v = _tangent_to_vec(np.array(0.0), np.array(lat_c), edge[:, 0], edge[:, 1])
    lat = np.arcsin(np.clip(v[..., 2], -1, 1))
    if abs(math.cos(lat_c)) <= h * abs(math.sin(lat_c)):  # a pole projects into the square
        if lat_c > 0:
            return float(lat.min()), math.pi / 2, math.pi
        return -math.pi / 2, float(lat.max()), math.pi
    dlon = np.abs(np.arctan2(v[..., 1], v[..., 0]))
    return float(lat.min()), float(lat.max()), float(dlon.max())


def patch_centers(npix: int, pixel_arcmin: float, *, lon_offset_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Centres (lon, lat) in degrees of non-overlapping gnomonic patches tiling the sphere in latitude bands.

    Bands start at the equator and are packed towards both poles; a final patch centred on a pole is
    added where it fits. ``lon_offset_deg`` rotates every band (another set of patches of the same map).
    """
    if npix < 1 or not pixel_arcmin > 0:
        raise ValueError(f"npix must be >= 1 and pixel_arcmin > 0, got {npix}, {pixel_arcmin}")
    h = npix * pixel_arcmin * ARCMIN / 2.0  # half side to the pixel edges, tangent-plane units
    if h >= 0.5:
        raise ValueError(f"patches of {2 * math.degrees(h):.1f} deg are too large for a gnomonic projection")
    margin = 1e-3 * pixel_arcmin * ARCMIN

    def lower(b: float) -> float:
        return _footprint_extent(b, h)[0]

    bands = [0.0]
    top = _footprint_extent(0.0, h)[1]
    polar = False
    while True:
        target = top + margin
        if lower(math.pi / 2) < target:
            break
        lo_b, hi_b = bands[-1], math.pi / 2
        for _ in range(60):
            mid = 0.5 * (lo_b + hi_b)
            if lower(mid) >= target:
                hi_b = mid
            else:
                lo_b = mid
        b = hi_b
        lat_min, lat_max, _ = _footprint_extent(b, h)
        if lat_max >= math.pi / 2 - 1e-12 or math.cos(b) <= h * math.sin(b):
            polar = True  # the next band would reach the pole: one patch centred on it instead
            break
        bands.append(b)
        top = lat_max
    lons, lats = [], []
    for b in bands:
        dlon = _footprint_extent(b, h)[2]
        nb = int(math.floor(math.pi / (dlon * (1 + 1e-6))))
        if nb < 1:
            continue
        lon = lon_offset_deg + np.arange(nb) * 360.0 / nb
        for sign in (1.0,) if b == 0.0 else (1.0, -1.0):
            lons.append(lon)
            lats.append(np.full(nb, sign * math.degrees(b)))
    if polar:
        lons.append(np.array([lon_offset_deg, lon_offset_deg]))
        lats.append(np.array([90.0, -90.0]))
    lon = np.concatenate(lons) % 360.0
    lat = np.concatenate(lats)
    order = np.lexsort((lon, -lat))  # north to south, then by longitude
    return lon[order], lat[order]


class Patches(NamedTuple):
    """Patches cut from a HEALPix map: ``maps`` float32 [P, N, N] (or [P, C, N, N] for several maps),
    ``lon``/``lat`` patch centres in degrees [P]."""

    maps: np.ndarray
    lon: np.ndarray
    lat: np.ndarray


def cut_patches(
    healpix_map: np.ndarray,
    npix: int,
    pixel_arcmin: float,
    *,
    nest: bool = False,
    interpolation: str = "bilinear",
    centers: tuple[Sequence[float], Sequence[float]] | None = None,
    lon_offset_deg: float = 0.0,
    max_patches: int | None = None,
    skip_masked: bool = True,
    name: str = "HEALPix map",
) -> Patches:
    """Cut square gnomonic patches (see module docstring) from a HEALPix map.

    Args:
        healpix_map: one map [12 nside²] or several [C, 12 nside²] (tomographic channels).
        npix: patch side in pixels.
        pixel_arcmin: patch pixel side in arcmin.
        nest: the map is in NESTED ordering (default RING).
        interpolation: ``"bilinear"`` (healpy's 4-pixel interpolation) or ``"nearest"``.
        centers: optional (lon, lat) in degrees; default :func:`patch_centers` (non-overlapping).
        lon_offset_deg: longitude rotation of the default layout.
        max_patches: keep at most this many patches (in layout order).
        skip_masked: drop patches touching ``hp.UNSEEN`` pixels; if False such patches raise.
        name: how to call the map in error messages (e.g. its file name).

    Raises:
        ValueError: bad map length, NaN values in the pixels used, or masked pixels with skip_masked=False.
    """
    import healpy as hp

    m = np.asarray(healpix_map)
    single = m.ndim == 1
    if single:
        m = m[None]
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a HEALPix map [Npix] or maps [C, Npix], got shape {np.shape(healpix_map)}")
    try:
        nside = hp.npix2nside(m.shape[1])
    except (ValueError, TypeError):
        raise ValueError(f"{name}: {m.shape[1]} pixels is not a valid HEALPix map size (12 nside^2)") from None
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if int(npix) != npix or npix < 1:
        raise ValueError(f"npix must be a positive integer, got {npix!r}")
    if not (isinstance(pixel_arcmin, (int, float, np.number)) and pixel_arcmin > 0):
        raise ValueError(f"pixel_arcmin must be positive, got {pixel_arcmin!r}")
    npix = int(npix)
    if centers is None:
        lon, lat = patch_centers(npix, pixel_arcmin, lon_offset_deg=lon_offset_deg)
    else:
        lon, lat = (np.atleast_1d(np.asarray(c, dtype=float)) for c in centers)
        if lon.shape != lat.shape:
            raise ValueError("centers: lon and lat must have the same length")
    C = m.shape[0]
    maps: list[np.ndarray] = []
    keep: list[int] = []
    chunk = max(1, (1 << 20) // (npix * npix))
    for lo in range(0, lon.size, chunk):
        if max_patches is not None and len(keep) >= max_patches:
            break
        sl = slice(lo, min(lo + chunk, lon.size))
        v = patch_directions(lon[sl], lat[sl], npix, pixel_arcmin).reshape(-1, 3)
        theta, phi = hp.vec2ang(v)
        if interpolation == "bilinear":
            pix, w = hp.get_interp_weights(nside, theta, phi, nest=nest)
        else:
            pix = hp.ang2pix(nside, theta, phi, nest=nest)[None]
            w = np.ones_like(pix, dtype=float)
        vals = m[:, pix]  # [C, 4 or 1, K]
        masked = (vals < -1e30).any(axis=(0, 1))  # hp.UNSEEN = -1.6375e30
        if np.isnan(vals).any():
            raise ValueError(f"{name}: NaN values in the HEALPix map (use hp.UNSEEN to mark masked pixels)")
        out = np.einsum("cik,ik->ck", np.where(masked[None, None], 0.0, vals), w)
        out = out.reshape(C, -1, npix, npix).transpose(1, 0, 2, 3)
        pmask = masked.reshape(-1, npix * npix).any(axis=1)
        for k in range(out.shape[0]):
            if pmask[k]:
                if not skip_masked:
                    raise ValueError(
                        f"{name}: patch {lo + k} at (lon, lat) = ({lon[lo + k]:.3f}, {lat[lo + k]:.3f}) "
                        "deg touches masked (UNSEEN) pixels"
                    )
                continue
            if max_patches is not None and len(keep) >= max_patches:
                break
            keep.append(lo + k)
            maps.append(out[k].astype(np.float32))
    idx = np.asarray(keep, dtype=np.int64)
    arr = np.stack(maps) if maps else np.zeros((0, C, npix, npix), np.float32)
    if single:
        arr = arr[:, 0]
    return Patches(arr, lon[idx], lat[idx])


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
