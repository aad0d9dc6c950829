"""Gnomonic patch cutter and full-sky (GLASS) backend against independent references.

The patch geometry is checked with astropy's own FITS ``TAN`` projection (not the code's), the
interpolation against an analytic function on the sphere, and the full-sky spectra against
:func:`convergence_cl` (theory) and healpy's ``anafast`` (measurement).
"""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest
from astropy.wcs import WCS
from helpers.cosmology import PLANCK18_MASSLESS
from scipy.stats import skew

from lensflow.sims.fullsky import FullSkySimulator, cut_patches, patch_centers, patch_directions
from lensflow.sims.theory import convergence_cl

COSMO = PLANCK18_MASSLESS
N, PIX = 32, 20.0  # 10.7 deg patches: a few hundred on the sphere


def _wcs(lon: float, lat: float, n: int = N, pix: float = PIX) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [lon, lat]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cdelt = [-pix / 60, pix / 60]
    w.wcs.lonpole = 180.0
    return w


def _smooth(x, y, z):
    """A low-ℓ (ℓ <= 2) function of the unit vector: smooth on the pixel scale."""
    return x + 0.5 * y * z + 0.3 * z**2 - 0.2 * x * y


@pytest.fixture(scope="module")
def smooth_map():
    nside = 256
    return nside, _smooth(*hp.pix2vec(nside, np.arange(hp.nside2npix(nside))))


def test_patches_match_the_function_at_astropy_tan_pixel_centres(smooth_map):
    nside, m = smooth_map
    p = cut_patches(m, N, PIX)
    assert p.maps.shape == (p.lon.size, N, N) and p.maps.dtype == np.float32
    jj, ii = np.meshgrid(np.arange(N), np.arange(N))  # FITS axis 1 = column j, axis 2 = row i
    worst = 0.0
    for k in range(p.maps.shape[0]):
        ra, dec = _wcs(p.lon[k], p.lat[k]).pixel_to_world_values(jj, ii)
        th, ph = np.radians(90 - dec), np.radians(ra)
        ref = _smooth(np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th))
        worst = max(worst, float(np.abs(p.maps[k] - ref).max()))
    # bilinear interpolation error ~ (HEALPix pixel)^2 x curvature ~ (4e-3 rad)^2: far below 1e-3
    assert worst < 1e-3, worst
    near = cut_patches(m, N, PIX, interpolation="nearest", max_patches=20)
    ref20 = p.maps[:20]
    # nearest pixel: error <= gradient (<= 2) x distance to the pixel centre (<= 1 HEALPix pixel ~ 4e-3)
    assert np.abs(near.maps - ref20).max() < 1e-2


def test_patches_do_not_overlap_and_tile_most_of_the_sphere():
    lon, lat = patch_centers(N, PIX)
    P = lon.size
    side = np.radians(N * PIX / 60)
    assert P * side**2 > 0.75 * 4 * np.pi  # packing efficiency of the band layout
    assert np.unique(np.round(np.c_[lon, lat], 6), axis=0).shape[0] == P
    vec = patch_directions(lon, lat, N, PIX).reshape(P, -1, 3)
    centres = hp.ang2vec(lon, lat, lonlat=True)
    diag = np.sqrt(2) * side
    for k in range(P):
        near = np.flatnonzero((centres @ centres[k] > np.cos(1.2 * diag)) & (np.arange(P) != k))
        pts = vec[near].reshape(-1, 3)
        plon, plat = hp.vec2ang(pts, lonlat=True)
        x, y = _wcs(lon[k], lat[k]).world_to_pixel_values(plon, plat)
        # inside patch k's footprint = within half a pixel of its outermost pixel centres
        inside = (x > -0.5) & (x < N - 0.5) & (y > -0.5) & (y < N - 0.5)
        # points on the far side of the sphere project onto the plane too: keep the near hemisphere
        inside &= pts @ centres[k] > 0
        assert not inside.any(), f"patch {k} at ({lon[k]:.2f}, {lat[k]:.2f}) overlaps a neighbour"


def test_patch_directions_agree_with_astropy_tan():
    for lon, lat in [(10.0, 0.0), (200.0, 47.3), (33.0, -80.0), (0.0, 90.0)]:
        v = patch_directions(lon, lat, 8, 30.0)[0]
        ra, dec = _wcs(lon, lat, 8, 30.0).pixel_to_world_values(*np.meshgrid(np.arange(8), np.arange(8)))
        ref = hp.ang2vec(ra.ravel(), dec.ravel(), lonlat=True).reshape(8, 8, 3)  # (healpy scrambles 2-D input)
        np.testing.assert_allclose(v, ref, atol=1e-10)


def test_masked_and_bad_maps(smooth_map):
    nside, m = smooth_map
    full = cut_patches(m, N, PIX)
    masked = m.copy()
    ipix = hp.query_disc(nside, hp.ang2vec(full.lon[5], full.lat[5], lonlat=True), np.radians(1.0))
    masked[ipix] = hp.UNSEEN
    part = cut_patches(masked, N, PIX)
    assert part.maps.shape[0] == full.maps.shape[0] - 1
    assert not np.any((part.lon == full.lon[5]) & (part.lat == full.lat[5]))
    with pytest.raises(ValueError, match="masked"):
        cut_patches(masked, N, PIX, skip_masked=False)
    nan = m.copy()
    nan[100] = np.nan
    with pytest.raises(ValueError, match="my.fits: NaN"):
        cut_patches(nan, N, PIX, name="my.fits")
    with pytest.raises(ValueError, match="not a valid HEALPix"):
        cut_patches(np.zeros(1000), N, PIX)
    two = cut_patches(np.stack([m, 2 * m]), N, PIX, max_patches=3)
    assert two.maps.shape == (3, 2, N, N)
    np.testing.assert_allclose(two.maps[:, 1], 2 * two.maps[:, 0], rtol=1e-6)


@pytest.fixture(scope="module")
def fullsky():
    sim = FullSkySimulator(64, COSMO, [0.5, 1.0], kind="lognormal", shell_dx=150.0)
    maps = [sim.realization(seed=0, index=r) for r in range(3)]
    return sim, maps


def test_born_shell_spectrum_matches_convergence_cl(fullsky):
    """Σ_ij w_i w_j C_ij^shell (the thin-shell Born sum) reproduces the Limber C_ℓ^κκ of the planes."""
    sim, _ = fullsky
    ell = np.arange(sim.lmax + 1)
    th = sim.theory_cl()
    ref = np.zeros_like(th)
    ref[..., 1:] = convergence_cl(ell[1:], COSMO, [0.5, 1.0])
    for lo, hi, tol in [(10, 30, 0.04), (30, 191, 0.015)]:
        r = th[..., lo:hi].sum(-1) / ref[..., lo:hi].sum(-1)
        np.testing.assert_allclose(r, 1.0, atol=tol)
    assert sim.z_edges[0] == 0 and 0.5 in sim.z_edges and sim.z_edges[-1] == 1.0


def test_fullsky_maps_have_the_expected_spectrum(fullsky):
    sim, maps = fullsky
    th = sim.theory_cl()
    lmax = 2 * sim.nside
    edges = [10, 20, 40, 64, 96, lmax]
    cls = np.array(
        [[hp.anafast(m[0], lmax=lmax), hp.anafast(m[1], lmax=lmax), hp.anafast(m[0], m[1], lmax=lmax)] for m in maps]
    ).mean(0)
    for a, (i, j) in enumerate([(0, 0), (1, 1), (0, 1)]):
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            ell = np.arange(lo, hi)
            ratio = cls[a, lo:hi].sum() / th[i, j, lo:hi].sum()
            # Gaussian cosmic variance of the band power from 3 skies (cross: >= auto's): 4 sigma + 1%
            se = np.sqrt(2.0 / (3 * (2 * ell + 1).sum()))
            assert abs(ratio - 1) < 4 * se + 0.01, f"C^{i}{j} ell {lo}-{hi}: ratio {ratio:.3f}"
    assert skew(maps[0][1]) > 0  # lognormal shells give a skewed convergence


def test_fullsky_reproducible_and_patches(fullsky):
    sim, maps = fullsky
    assert not np.allclose(maps[0], maps[1])
    per_sky = patch_centers(16, 60.0)[0].size
    # skies 1 and 2 drawn again (same seed): identical to the fixture's, cut into patches, the second in part
    got = list(sim.patches(per_sky + 5, 16, 60.0, seed=0, start=1))
    assert [r for _, r in got] == [1, 2]
    assert got[0][0].shape == (per_sky, 2, 16, 16) and got[1][0].shape == (5, 2, 16, 16)
    np.testing.assert_array_equal(got[0][0], cut_patches(maps[1], 16, 60.0).maps)
    np.testing.assert_array_equal(got[1][0], cut_patches(maps[2], 16, 60.0, max_patches=5).maps)


def test_fullsky_bad_arguments():
    with pytest.raises(ValueError, match="nside"):
        FullSkySimulator(100, COSMO, 1.0)
    with pytest.raises(ValueError, match="kind"):
        FullSkySimulator(64, COSMO, 1.0, kind="poisson")
