"""lensflow.stats against independent references: brute-force loops, numpy/scipy, exact geometry.

The comparisons with Gaussian-field theory (peak abundance, Minkowski functionals, PDF, C_ℓ recovery)
live in test_stats_theory.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats as sps
import torch
from helpers.fields import skewed_maps
from helpers.stats import kappa_config

import lensflow.stats as S
from lensflow.stats import ARCMIN

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# brute-force references (pure Python loops over pixels), written independently of the library


def _brute_extrema(m: np.ndarray, edges: np.ndarray, periodic: bool, border: int, minima: bool) -> np.ndarray:
    n = m.shape[0]
    cut = border if periodic else max(border, 1)
    heights = []
    for i in range(cut, n - cut):
        for j in range(cut, n - cut):
            c = m[i, j]
            ok = True
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if di == 0 and dj == 0:
                        continue
                    q = m[(i + di) % n, (j + dj) % n]
                    if (minima and not c < q) or (not minima and not c > q):
                        ok = False
            if ok:
                heights.append(c)
    return np.histogram(np.asarray(heights), edges)[0].astype(float)


def _brute_minkowski(m: np.ndarray, t: np.ndarray, pix: float) -> np.ndarray:
    """V0, V1, V2 of one non-periodic map by per-pixel loops (Kratochvil et al. 2012 estimators)."""
    n, nb = m.shape[0], t.size - 1
    v = np.zeros((3, nb))
    npx = 0
    mids = 0.5 * (t[1:] + t[:-1])
    for i in range(1, n - 1):
        for j in range(1, n - 1):
            npx += 1
            c = m[i, j]
            kx = (m[i, j + 1] - m[i, j - 1]) / (2 * pix)
            ky = (m[i + 1, j] - m[i - 1, j]) / (2 * pix)
            kxx = (m[i, j + 1] - 2 * c + m[i, j - 1]) / pix**2
            kyy = (m[i + 1, j] - 2 * c + m[i - 1, j]) / pix**2
            kxy = (m[i + 1, j + 1] - m[i + 1, j - 1] - m[i - 1, j + 1] + m[i - 1, j - 1]) / (4 * pix**2)
            g2 = kx * kx + ky * ky
            for b in range(nb):
                v[0, b] += c >= mids[b]
                if t[b] <= c < t[b + 1]:
                    width = t[b + 1] - t[b]
                    v[1, b] += math.sqrt(g2) / (4 * width)
                    if g2 > 0:
                        v[2, b] += (2 * kx * ky * kxy - kx * kx * kyy - ky * ky * kxx) / g2 / (2 * math.pi * width)
    return v / npx


def _full_plane_cl(m: np.ndarray, pix: float, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C_ℓ by averaging A_pix² |FFT|² / A over the full Fourier plane of numpy's fft2."""
    n = m.shape[-1]
    d = pix * ARCMIN
    f = np.fft.fft2(m)
    p = np.abs(f) ** 2 * d**4 / (n * d) ** 2
    ell = 2 * np.pi * np.hypot(*np.meshgrid(np.fft.fftfreq(n, d), np.fft.fftfreq(n, d), indexing="ij"))
    cl, lm = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (ell > lo * (1 + 1e-12)) & (ell <= hi * (1 + 1e-12))
        cl.append(p[..., sel].mean(axis=-1))
        lm.append(ell[sel].mean())
    return np.asarray(lm), np.stack(cl, axis=-1)


# --------------------------------------------------------------------------------------------------
# power spectrum


@pytest.mark.parametrize("npix", [16, 15])
def test_power_spectrum_matches_full_plane_numpy(npix):
    pix = 0.7
    maps = np.random.default_rng(1).standard_normal((3, npix, npix))
    edges = np.array([0.0, 3000.0, 7000.0, 12000.0, 30000.0])
    ell, cl = S.power_spectrum(maps, pix, edges)
    ell_ref, cl_ref = _full_plane_cl(maps, pix, edges)
    np.testing.assert_allclose(cl, cl_ref, rtol=1e-12)
    np.testing.assert_allclose(ell, ell_ref, rtol=1e-12)
    ell2, n_modes = S.ell_modes(npix, pix, edges)
    np.testing.assert_allclose(ell2, ell_ref, rtol=1e-12)
    assert n_modes.sum() == npix * npix - 1  # every mode but ℓ = 0 lies in (0, 30000]


def test_shape_noise_power_is_sigma_e2_over_n_gal():
    # white shape noise has the flat spectrum N_ℓ = σ_e² / n_gal (n_gal per steradian)
    pix, sigma_e, n_gal = 1.0, 0.3, 20.0
    noise = S.shape_noise((40, 128, 128), pix, sigma_e, n_gal, generator=3)
    edges = S.default_ell_edges(128, pix)
    _, cl = S.power_spectrum(noise, pix, edges)
    n_modes = S.ell_modes(128, pix, edges)[1]
    expected = sigma_e**2 / (n_gal / ARCMIN**2)
    # mode-weighted mean over 40 maps x ~8000 independent modes: 0.25 % statistical error
    assert abs((cl.mean(axis=0) * n_modes).sum() / n_modes.sum() / expected - 1) < 0.01
    assert noise.std() == pytest.approx(sigma_e / math.sqrt(n_gal * pix**2), rel=0.01)


def test_power_spectrum_scales_as_amplitude_squared_and_cross_spectra():
    pix = 1.0
    x = skewed_maps((4, 64, 64), 2.0, 0, periodic=False)
    edges = S.default_ell_edges(64, pix, 8)
    _, c1 = S.power_spectrum(x, pix, edges)
    _, c3 = S.power_spectrum(3.0 * x, pix, edges)
    np.testing.assert_allclose(c3, 9.0 * c1, rtol=1e-12)
    # channels: (x, -2x, independent y): cross spectra follow bilinearity, auto ones the plain function
    y = skewed_maps((4, 64, 64), 2.0, 5, periodic=False)
    stack = np.stack([x, -2.0 * x, y], axis=1)
    _, cross = S.power_spectrum(stack, pix, edges, cross=True)
    _, auto = S.power_spectrum(stack, pix, edges)
    assert cross.shape == (4, 3, 3, edges.size - 1) and auto.shape == (4, 3, edges.size - 1)
    np.testing.assert_allclose(cross[:, 0, 1], -2.0 * c1, rtol=1e-12)
    np.testing.assert_allclose(cross[:, 1, 1], 4.0 * c1, rtol=1e-12)
    np.testing.assert_allclose(cross, np.swapaxes(cross, 1, 2), rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(cross, axis1=1, axis2=2), np.swapaxes(auto, 1, 2), rtol=1e-12)
    # an independent reference for one cross spectrum: Re(F_x conj F_y) over the full plane
    d = pix * ARCMIN
    fx, fy = np.fft.fft2(x[0]), np.fft.fft2(stack[0, 2])
    ell = 2 * np.pi * np.hypot(*np.meshgrid(np.fft.fftfreq(64, d), np.fft.fftfreq(64, d), indexing="ij"))
    sel = (ell > edges[3] * (1 + 1e-12)) & (ell <= edges[4] * (1 + 1e-12))
    ref = (fx * np.conj(fy)).real[sel].mean() * d**2 / 64**2
    assert cross[0, 0, 2, 3] == pytest.approx(ref, rel=1e-10)


def test_default_ell_edges():
    e = S.default_ell_edges(128, 0.5)
    side = 128 * 0.5 * ARCMIN
    assert e[0] == pytest.approx(2 * 2 * np.pi / side) and e[-1] == pytest.approx(np.pi / (0.5 * ARCMIN))
    assert e.size == 21 and np.allclose(np.diff(np.log(e)), np.log(e[1] / e[0]))
    small = S.default_ell_edges(64, 0.5)  # a log bin near 2 ℓ_min holds no lattice mode there
    assert small.size < 21
    assert np.all(S.ell_modes(64, 0.5, small)[1] > 0)
    with pytest.raises(ValueError, match="^ell_edges: bin 1"):
        S.power_spectrum(np.zeros((64, 64)), 0.5, np.geomspace(small[0], small[-1], 21))


# --------------------------------------------------------------------------------------------------
# smoothing and noise


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("sigma_pix", [0.6, 1.0, 2.5, 7.0])
def test_smooth_matches_scipy_gaussian_filter(periodic, sigma_pix):
    pix = 0.5
    maps = np.random.default_rng(2).standard_normal((3, 48, 48))
    out = S.smooth(maps, pix, sigma_pix * pix, periodic=periodic)
    mode = "wrap" if periodic else "constant"
    ref = np.stack([ndi.gaussian_filter(m, sigma_pix, mode=mode, truncate=4.0) for m in maps])
    np.testing.assert_allclose(out, ref, atol=1e-13)
    t = S.smooth(torch.from_numpy(maps).float(), pix, sigma_pix * pix, periodic=periodic)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)


def test_smooth_zero_sigma_is_identity_and_weights_are_scipys():
    m = np.random.default_rng(3).standard_normal((20, 20))
    np.testing.assert_array_equal(S.smooth(m, 1.0, 0.0), m)
    w = S.gaussian_weights(2.0)
    assert w.size == 17 and w.sum() == pytest.approx(1.0)


def test_smoothed_white_noise_has_the_continuum_sigma():
    # σ_e / sqrt(4π σ_s² n_gal) is the continuum limit; with σ_s = 4 pixels the sampled kernel is
    # within a fraction of a percent of it
    pix, sigma_s = 0.5, 1.0
    continuum = S.smoothed_noise_sigma(0.26, 30.0, sigma_s)
    # the exact σ after the sampled separable kernel (weights computed here, scipy's recipe):
    # σ_pix sqrt(Σ_ij (w_i w_j)²) = σ_pix Σ w² for unit-sum w
    j = np.arange(-8, 9)
    w = np.exp(-0.5 * (j / (sigma_s / pix)) ** 2)
    w /= w.sum()
    exact = S.pixel_noise_sigma(pix, 0.26, 30.0) * (w**2).sum()
    assert exact == pytest.approx(continuum, rel=0.005)
    noise = S.shape_noise((16, 256, 256), pix, 0.26, 30.0, generator=np.random.default_rng(4))
    sm = S.smooth(noise, pix, sigma_s, periodic=True)
    # ~2e4 independent patches: 0.5 % standard error on the measured σ
    assert sm.std() == pytest.approx(exact, rel=0.02)
    assert S.smoothed_noise_sigma(0.26, 30.0, 2.0) == pytest.approx(0.26 / math.sqrt(4 * math.pi * 4 * 30))
    assert S.pixel_noise_sigma(0.5, 0.26, 30.0) == pytest.approx(0.26 / math.sqrt(30 * 0.25))


def test_shape_noise_generators():
    a = S.shape_noise((2, 8, 8), 1.0, generator=7)
    b = S.shape_noise((2, 8, 8), 1.0, generator=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    g = torch.Generator().manual_seed(1)
    t = S.shape_noise((2, 8, 8), 1.0, generator=g, dtype=torch.float64)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 8, 8) and t.dtype == torch.float64
    t2 = S.shape_noise((2, 8, 8), 1.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(t, t2)
    with pytest.raises(ValueError, match="^generator"):
        S.shape_noise((4, 4), 1.0, generator="seed")
    with pytest.raises(ValueError, match="^n_gal"):
        S.shape_noise((4, 4), 1.0, n_gal=0.0)


# --------------------------------------------------------------------------------------------------
# peaks, minima, pdf, moments


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("border", [0, 2])
def test_extrema_match_brute_force_with_ties(periodic, border):
    rng = np.random.default_rng(5)
    maps = np.concatenate([rng.standard_normal((2, 13, 13)), rng.integers(0, 4, (2, 13, 13)).astype(float)])
    edges = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    pk = S.peak_counts(maps, edges, periodic=periodic, border=border)
    mn = S.minima_counts(maps, edges, periodic=periodic, border=border)
    for i, m in enumerate(maps):
        np.testing.assert_array_equal(pk[i], _brute_extrema(m, edges, periodic, border, minima=False))
        np.testing.assert_array_equal(mn[i], _brute_extrema(m, edges, periodic, border, minima=True))


def test_one_bump_one_peak_and_plateaus_do_not_count():
    y, x = np.mgrid[:64, :64]
    bump = 0.05 * np.exp(-((x - 30.3) ** 2 + (y - 25.7) ** 2) / (2 * 5.0**2))
    edges = np.linspace(0.0, 0.06, 7)
    counts = S.peak_counts(bump, edges)
    assert counts.sum() == 1 and counts[4] == 1  # the top pixel, 0.0498, lies in [0.04, 0.05)
    assert S.peak_counts(bump, edges, periodic=True).sum() == 1
    assert S.minima_counts(-bump, -edges[::-1]).sum() == 1
    flat = np.zeros((16, 16))
    flat[7, 7] = flat[7, 8] = 1.0  # a two-pixel plateau is not a strict maximum
    assert S.peak_counts(flat, [0.5, 1.5]).sum() == 0


def test_pixel_pdf_and_moments_match_numpy_scipy():
    maps = skewed_maps((3, 40, 40), 1.5, 0, periodic=False)
    edges = np.linspace(-0.02, 0.03, 11)
    pdf = S.pixel_pdf(maps, edges)
    for i, m in enumerate(maps):
        ref = np.histogram(m, edges)[0] / (m.size * np.diff(edges))
        np.testing.assert_allclose(pdf[i], ref, rtol=1e-12)
    mom = S.moments(maps)
    for i, m in enumerate(maps):
        v = m.ravel()
        ref = [v.mean(), v.var(), sps.skew(v), sps.kurtosis(v)]
        np.testing.assert_allclose(mom[i], ref, rtol=1e-10)
    mb = S.moments(maps, border=3)
    np.testing.assert_allclose(mb[0, 1], maps[0, 3:-3, 3:-3].var(), rtol=1e-10)


def test_histogram_edge_semantics_follow_numpy():
    # values exactly on uniform and non-uniform edges, on the last edge, and outside
    v = np.array([[-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0000001, 2.0, 0.1, 0.3, 0.7, 0.99] * 3]).reshape(6, 6)
    for edges in (np.linspace(0.0, 1.0, 5), np.array([0.0, 0.1, 0.3, 0.7, 1.0])):
        got = S.pixel_pdf(v, edges) * v.size * np.diff(edges)
        np.testing.assert_allclose(got, np.histogram(v, edges)[0], rtol=1e-12)
    # enough values for the arithmetic (uniform-edge) path, many of them exactly on edges
    big = np.round(np.random.default_rng(6).uniform(-0.2, 1.2, (4, 64, 64)) * 20) / 20
    edges = np.linspace(0.0, 1.0, 21)
    got = S.pixel_pdf(big, edges) * 64 * 64 * np.diff(edges)
    for i in range(4):
        np.testing.assert_allclose(got[i], np.histogram(big[i], edges)[0], rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Minkowski functionals


def test_minkowski_matches_brute_force_loops():
    pix = 0.7
    maps = skewed_maps((2, 14, 14), 1.2, 7, periodic=False)
    t = np.linspace(-0.012, 0.02, 9)
    v0, v1, v2 = S.minkowski(maps, t, pix)
    for i, m in enumerate(maps):
        ref = _brute_minkowski(m, t, pix)
        np.testing.assert_allclose(v0[i], ref[0], rtol=1e-12)
        np.testing.assert_allclose(v1[i], ref[1], rtol=1e-10)
        np.testing.assert_allclose(v2[i], ref[2], rtol=1e-9, atol=1e-12 * np.abs(ref[2]).max())


@pytest.mark.parametrize("pix", [0.5, 2.0])
def test_minkowski_of_disks_is_exact_geometry(pix):
    # κ = bump(s): the excursion set {κ >= ν} is a disk of radius R(ν) = b sqrt(-2 ln(ν / h)), so
    # V0 = πR²/A, V1 = 2πR / 4A (bin-averaged) and V2 = χ/A = 1/A (Gauss-Bonnet), in arcmin units
    npix, b_pix = 128, 12.0
    y, x = np.mgrid[:npix, :npix] - npix / 2 + 0.3
    kappa = np.exp(-(x**2 + y**2) / (2 * b_pix**2))
    t = np.linspace(0.1, 0.9, 9)
    v0, v1, v2 = S.minkowski(kappa, t, pix)
    area = ((npix - 2) * pix) ** 2  # the outer pixel ring has no stencil
    b = b_pix * pix
    mid = 0.5 * (t[1:] + t[:-1])
    radius = b * np.sqrt(-2 * np.log(mid))
    # ∫ R dν over a bin, in closed form: R = b sqrt(-2 ln ν); use fine quadrature
    nu = np.linspace(t[:-1], t[1:], 2001)
    v1_ref = np.trapezoid(2 * np.pi * b * np.sqrt(-2 * np.log(nu)) / (4 * area), nu, axis=0) / np.diff(t)
    np.testing.assert_allclose(v0, np.pi * radius**2 / area, rtol=0.03)
    np.testing.assert_allclose(v1, v1_ref, rtol=0.03)
    np.testing.assert_allclose(v2 * area, 1.0, atol=0.03)
    # two well separated bumps: χ = 2 and two peaks
    two = np.exp(-((x - 32) ** 2 + y**2) / (2 * b_pix**2)) + np.exp(-((x + 32) ** 2 + y**2) / (2 * b_pix**2))
    _, _, w2 = S.minkowski(two, t, pix)
    np.testing.assert_allclose(w2 * area, 2.0, atol=0.06)
    assert S.peak_counts(two, [0.5, 1.5]).sum() == 2


# --------------------------------------------------------------------------------------------------
# invariances, batching, input handling


def _all_stats(maps, pix=1.0, periodic=False):
    e = np.linspace(-0.02, 0.04, 13)
    out = {
        "peaks": S.peak_counts(maps, e, periodic=periodic),
        "minima": S.minima_counts(maps, e, periodic=periodic),
        "pdf": S.pixel_pdf(maps, e),
        "moments": S.moments(maps),
        "cl": S.power_spectrum(maps, pix, S.default_ell_edges(maps.shape[-1], pix, 8))[1],
    }
    out["v0"], out["v1"], out["v2"] = S.minkowski(maps, e, pix, periodic=periodic)
    return out


@pytest.mark.parametrize("periodic", [False, True])
def test_invariant_under_rotations_and_flips(periodic):
    maps = skewed_maps((3, 48, 48), 1.5, 8, periodic=False)
    ref = _all_stats(maps, periodic=periodic)
    for op in (
        lambda m: np.rot90(m, 1, axes=(-2, -1)),
        lambda m: np.rot90(m, 2, axes=(-2, -1)),
        lambda m: np.rot90(m, 3, axes=(-2, -1)),
        lambda m: m[..., ::-1],
        lambda m: m[..., ::-1, :],
        lambda m: np.swapaxes(m, -1, -2),
    ):
        got = _all_stats(np.ascontiguousarray(op(maps)), periodic=periodic)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-12 * np.abs(ref[k]).max(), err_msg=k)


def test_batched_equals_per_map_loop_and_channels():
    maps = skewed_maps((4, 32, 32), 1.2, 9, periodic=False).reshape(2, 2, 32, 32)
    batched = _all_stats(maps)
    for k, v in batched.items():
        assert v.shape[:2] == (2, 2), k
        for b in range(2):
            for c in range(2):
                single = _all_stats(maps[b, c])[k]
                np.testing.assert_allclose(v[b, c], single, rtol=1e-12, atol=1e-300, err_msg=k)


def test_torch_in_torch_out_numpy_in_numpy_out():
    m = skewed_maps((2, 32, 32), 1.2, 0, periodic=False)
    t = torch.from_numpy(m)
    e = np.linspace(-0.02, 0.04, 7)
    for fn in (
        lambda x: S.peak_counts(x, e),
        lambda x: S.pixel_pdf(x, e),
        lambda x: S.moments(x),
        lambda x: S.minkowski(x, e, 1.0)[1],
        lambda x: S.power_spectrum(x, 1.0, S.default_ell_edges(32, 1.0, 5))[1],
        lambda x: S.smooth(x, 1.0, 1.0),
    ):
        a, b = fn(m), fn(t)
        assert isinstance(a, np.ndarray) and a.dtype == np.float64
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64 and b.device == t.device
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-12)
        c = fn(t.float())
        assert c.dtype == torch.float32
    ell, _ = S.power_spectrum(t, 1.0, S.default_ell_edges(32, 1.0, 5))
    assert isinstance(ell, torch.Tensor)


BAD_MAPS = {
    "nan": np.full((2, 16, 16), np.nan),
    "inf": np.where(np.eye(16, dtype=bool), np.inf, 0.0)[None],
    "nonsquare": np.zeros((2, 16, 12)),
    "1d": np.zeros(16),
}
CALLS = {
    "power_spectrum": lambda m: S.power_spectrum(m, 1.0, [100.0, 5000.0]),
    "smooth": lambda m: S.smooth(m, 1.0, 1.0),
    "peak_counts": lambda m: S.peak_counts(m, [0.0, 1.0]),
    "minima_counts": lambda m: S.minima_counts(m, [0.0, 1.0]),
    "pixel_pdf": lambda m: S.pixel_pdf(m, [0.0, 1.0]),
    "minkowski": lambda m: S.minkowski(m, [0.0, 1.0], 1.0),
    "moments": lambda m: S.moments(m),
    "summarize": lambda m: S.summarize(m, {"pixel_arcmin": 1.0, "bin_units": "kappa", "ell_nbins": 3}),
}


@pytest.mark.parametrize("bad", sorted(BAD_MAPS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_bad_maps_raise_naming_maps(bad, call):
    msg = {"nan": "NaN or Inf", "inf": "NaN or Inf", "nonsquare": "square", "1d": "shape"}[bad]
    with pytest.raises(ValueError, match=f"^maps: .*{msg}"):
        CALLS[call](BAD_MAPS[bad])
    with pytest.raises(ValueError, match="^maps: "):
        CALLS[call](torch.from_numpy(BAD_MAPS[bad]))


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: S.peak_counts(m, [0.0, 2.0, 1.0]), "edges"),
        (lambda m: S.minima_counts(m, [0.0, 0.0]), "edges"),
        (lambda m: S.pixel_pdf(m, [1.0]), "edges"),
        (lambda m: S.pixel_pdf(m, [0.0, np.nan]), "edges"),
        (lambda m: S.minkowski(m, [1.0, 0.5], 1.0), "thresholds"),
        (lambda m: S.power_spectrum(m, 1.0, [5000.0, 100.0]), "ell_edges"),
        (lambda m: S.power_spectrum(m, 0.0, [100.0, 5000.0]), "pixel_arcmin"),
        (lambda m: S.power_spectrum(m, -1.0, [100.0, 5000.0]), "pixel_arcmin"),
        (lambda m: S.minkowski(m, [0.0, 1.0], -0.5), "pixel_arcmin"),
        (lambda m: S.smooth(m, 0.0, 1.0), "pixel_arcmin"),
        (lambda m: S.smooth(m, 1.0, -1.0), "sigma_arcmin"),
        (lambda m: S.default_ell_edges(16, -1.0), "pixel_arcmin"),
        (lambda m: S.shape_noise((4, 4), 0.0), "pixel_arcmin"),
        (lambda m: S.peak_counts(m, [0.0, 1.0], border=8), "border"),
        (lambda m: S.power_spectrum(m, 1.0, [100.0, 5000.0], cross=True), "cross"),
        (lambda m: S.summarize(m, {"pixel_arcmin": -1.0}), "config.pixel_arcmin"),
        (lambda m: S.summarize(m, {"pixel_arcmin": 1.0, "bins": 3}), "config"),
        (lambda m: S.summarize(m, {"pixel_arcmin": 1.0}), "config.bin_units"),
        (lambda m: S.summarize(m, {"pixel_arcmin": 1.0, "sigma_e": 0.3}), "generator"),
        (
            lambda m: S.summarize(m, {"pixel_arcmin": 1.0, "bin_units": "kappa", "pdf_edges": [1, 0]}),
            "config.pdf_edges",
        ),
    ],
)
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=f"^{name}[:\\s]"):
        call(np.zeros((3, 16, 16)))


# --------------------------------------------------------------------------------------------------
# summarize


_cfg = functools.partial(kappa_config, pixel_arcmin=1.0, smoothing_arcmin=(1.0, 2.5), n_edges=(7, 7, 9, 7))


def test_summarize_equals_the_individual_functions():
    maps = skewed_maps((5, 48, 48), 1.5, 10, periodic=False)
    cfg = _cfg(border_arcmin=2.5)
    out = S.summarize(maps, cfg)
    bins = S.summary_bins(cfg, 48)
    assert set(out) == set(bins)
    e = np.asarray(cfg.peak_edges)
    ell_e = S.default_ell_edges(48, 1.0, 8)
    np.testing.assert_allclose(out["cl"], S.power_spectrum(maps, 1.0, ell_e)[1], rtol=1e-12)
    np.testing.assert_allclose(bins["cl"], S.power_spectrum(maps, 1.0, ell_e)[0], rtol=1e-12)
    for s in (1.0, 2.5):
        lab = f"{s!r}arcmin"
        sm = S.smooth(maps, 1.0, s)
        t = np.asarray(cfg.minkowski_thresholds)
        ref = {
            "peaks": S.peak_counts(sm, e, border=3),
            "minima": S.minima_counts(sm, np.asarray(cfg.minima_edges), border=3),
            "pdf": S.pixel_pdf(sm, np.asarray(cfg.pdf_edges), border=3),
            "moments": S.moments(sm, border=3),
        }
        ref["v0"], ref["v1"], ref["v2"] = S.minkowski(sm, t, 1.0, border=3)
        for k, v in ref.items():
            assert out[f"{k}@{lab}"].shape == (5, v.shape[-1]) == (5, bins[f"{k}@{lab}"].size)
            np.testing.assert_allclose(out[f"{k}@{lab}"], v, rtol=1e-10, atol=1e-300, err_msg=k)
        np.testing.assert_allclose(bins[f"peaks@{lab}"], 0.5 * (e[1:] + e[:-1]))


def test_summarize_noise_is_reproducible_and_independent_of_chunking():
    maps = skewed_maps((6, 32, 32), 1.2, 11, periodic=False)
    cfg = _cfg(sigma_e=0.26, n_gal=30.0, bin_units="nu", peak_edges=tuple(np.linspace(-2, 5, 8)),
               minima_edges=tuple(np.linspace(-5, 2, 8)), pdf_edges=tuple(np.linspace(-4, 5, 10)),
               minkowski_thresholds=tuple(np.linspace(-2, 3, 11)))  # fmt: skip
    g = np.random.default_rng(5)
    whole = S.summarize(maps, cfg, generator=np.random.default_rng(5))
    parts = [S.summarize(maps[:2], cfg, generator=g), S.summarize(maps[2:], cfg, generator=g)]
    for k in whole:
        np.testing.assert_allclose(whole[k], np.concatenate([p[k] for p in parts]), rtol=1e-12, err_msg=k)
    # maps differ only by noise: same seed, same numbers; the noise is the configured one
    a = S.summarize(np.zeros((3, 32, 32)), dict(cfg.to_dict(), noise_seed=1))
    b = S.summarize(np.zeros((3, 32, 32)), dict(cfg.to_dict(), noise_seed=1))
    np.testing.assert_array_equal(a["cl"], b["cl"])
    n_ell = 0.26**2 / (30.0 / ARCMIN**2)
    assert a["cl"].mean() == pytest.approx(n_ell, rel=0.1)
    assert not np.allclose(a["cl"][0], a["cl"][1], rtol=0.01, atol=0)  # independent noise per map
    # torch generators give tensors and their own (per-map) stream
    t = S.summarize(torch.zeros(3, 32, 32), cfg, generator=torch.Generator().manual_seed(0))
    assert isinstance(t["cl"], torch.Tensor) and t["cl"].shape == a["cl"].shape


def test_summarize_multichannel_layout():
    maps = skewed_maps((6, 32, 32), 1.2, 12, periodic=False).reshape(3, 2, 32, 32)
    cfg = _cfg()
    out = S.summarize(maps, cfg)
    bins = S.summary_bins(cfg, 32, nchannels=2)
    nb = S.default_ell_edges(32, 1.0, 8).size - 1
    assert out["cl"].shape == (3, 3 * nb) == (3, bins["cl"].size)
    _, cross = S.power_spectrum(maps, 1.0, S.default_ell_edges(32, 1.0, 8), cross=True)
    np.testing.assert_allclose(out["cl"].reshape(3, 3, nb), cross[:, [0, 0, 1], [0, 1, 1]], rtol=1e-12)
    pk = S.peak_counts(S.smooth(maps, 1.0, 1.0), np.asarray(cfg.peak_edges))
    np.testing.assert_allclose(out["peaks@1.0arcmin"], pk.reshape(3, -1))
    assert out["peaks@1.0arcmin"].shape[1] == bins["peaks@1.0arcmin"].size
    one = S.summarize(maps[0, 0], cfg)
    assert one["moments@2.5arcmin"].shape == (1, 4)


def test_reference_sigma_gives_both_sets_the_same_kappa_edges():
    sims = skewed_maps((6, 32, 32), 1.2, 13, periodic=False)
    mocks = 1.3 * skewed_maps((6, 32, 32), 1.2, 14, periodic=False)
    cfg = S.SummaryConfig(pixel_arcmin=1.0, smoothing_arcmin=(0.0, 2.0), ell_nbins=6)
    fixed = S.with_reference_sigma(sims, cfg)
    for i, s in enumerate((0.0, 2.0)):
        pooled = S.smooth(sims, 1.0, s).std()
        assert fixed.sigma_ref[i] == pytest.approx(pooled, rel=1e-10)
    e = S.kappa_edges(fixed)
    np.testing.assert_allclose(e["peaks@2.0arcmin"], np.asarray(cfg.peak_edges) * fixed.sigma_ref[1])
    a, b = S.summarize(sims, fixed), S.summarize(mocks, fixed)
    assert a.keys() == b.keys()
    assert b["pdf@2.0arcmin"].sum() < a["pdf@2.0arcmin"].sum()  # wider mocks spill out of the sims' edges


def test_config_round_trip_and_from_dict():
    cfg = _cfg(sigma_e=0.3, noise_seed=4, smoothing_arcmin=[1, 2])
    d = cfg.to_dict()
    assert S.SummaryConfig.from_dict(d) == cfg
    assert cfg.smoothing_arcmin == (1.0, 2.0)
    per_scale = _cfg(peak_edges=[[0.0, 0.01, 0.02], [0.0, 0.005, 0.01]])
    e = S.kappa_edges(per_scale)
    np.testing.assert_allclose(e["peaks@2.5arcmin"], [0.0, 0.005, 0.01])
    with pytest.raises(ValueError, match="^config.peak_edges: per-scale"):
        _cfg(peak_edges=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="^config.statistics"):
        _cfg(statistics=("peaks", "bispectrum"))
    only = S.summarize(skewed_maps((2, 32, 32), 1.2, 0, periodic=False), _cfg(statistics=("peaks",)))
    assert sorted(only) == ["peaks@1.0arcmin", "peaks@2.5arcmin"]


def test_inputs_are_not_modified():
    m = torch.from_numpy(skewed_maps((3, 32, 32), 1.2, 0, periodic=False))
    before = m.clone()
    S.summarize(m, _cfg(sigma_e=0.3, noise_seed=0, periodic=True))
    S.summarize(m, _cfg())
    S.smooth(m, 1.0, 0.0)
    assert torch.equal(m, before)


def test_float32_internals_agree_with_float64():
    # GPUs compute in float32: run the same internal kernels in float32 on the CPU against float64
    from lensflow.stats._bins import Bins, MinkowskiBins
    from lensflow.stats.minkowski import minkowski_tensor
    from lensflow.stats.peaks import extrema_counts

    x64 = torch.from_numpy(skewed_maps((4, 64, 64), 2.0, 16, periodic=False))
    x32 = x64.float()
    e = np.linspace(-0.02, 0.04, 13)
    cpu = torch.device("cpu")
    for minima in (False, True):
        a = extrema_counts(x64, Bins(e, cpu, torch.float64), False, 0, minima)
        b = extrema_counts(x32, Bins(e, cpu, torch.float32), False, 0, minima)
        assert float((a - b.double()).abs().sum()) <= 2.0  # a peak may cross an edge by rounding
    b32 = Bins(e, cpu, torch.float32)
    assert b32.uniform
    h = b32.histogram(x32)
    ref = np.stack([np.histogram(m.numpy(), e.astype(np.float32))[0] for m in x32])
    np.testing.assert_array_equal(h.numpy(), ref)
    v64 = minkowski_tensor(x64, MinkowskiBins(e, cpu, torch.float64), 1.0, False, 0)
    v32 = minkowski_tensor(x32, MinkowskiBins(e, cpu, torch.float32), 1.0, False, 0)
    for j in range(3):
        scale = float(v64[:, j].abs().max())
        assert float((v32[:, j].double() - v64[:, j]).abs().max()) < 0.02 * scale


# --------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    maps = torch.from_numpy(skewed_maps((8, 64, 64), 1.5, 15, periodic=False))
    cfg = _cfg()
    cpu = S.summarize(maps, cfg)
    gpu64 = S.summarize(maps.cuda(), cfg)
    gpu32 = S.summarize(maps.float().cuda(), cfg)
    for k in cpu:
        assert gpu64[k].device.type == "cuda" and gpu32[k].dtype == torch.float32
        ref = cpu[k].numpy()
        np.testing.assert_allclose(gpu64[k].cpu().numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max(), err_msg=k)
        # float32: a pixel or a peak may cross a bin edge by rounding; smooth quantities agree closely
        stat = k.split("@")[0]
        tol = {"peaks": 2.0, "minima": 2.0, "cl": 1e-5, "moments": 1e-3}.get(stat, 0.02 * np.abs(ref).max())
        if stat in ("cl", "moments"):
            tol *= np.abs(ref).max()
        assert float(np.abs(gpu32[k].cpu().double().numpy() - ref).max()) <= tol, k
    e = np.linspace(-0.02, 0.04, 7)
    for fn in (lambda x: S.peak_counts(x, e), lambda x: S.minkowski(x, e, 1.0)[2], lambda x: S.smooth(x, 1.0, 2.0)):
        np.testing.assert_allclose(fn(maps.cuda()).cpu().numpy(), fn(maps).numpy(), rtol=1e-9, atol=1e-12)
