"""Gnomonic patches of HEALPix maps: patch centres, pixel directions and the cutter.

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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lensflow._util.units import ARCMIN

__all__ = ["Patches", "cut_patches", "patch_centers", "patch_directions"]


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
