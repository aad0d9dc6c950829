"""Theory spectra and the flat-sky simulator against independent references.

References used here, all written in this file: a Limber integral of pyccl's halofit P(k) with the
single-plane lensing kernel; the linear-theory σ8² scaling; the Hilbert et al. (2011) polynomial (and
GLASS's copy of it); an FFT power-spectrum estimator; and the exact expectation of that estimator for a
crop of a periodic field, computed from the theory C_ℓ through the correlation function.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cosmology import PLANCK18_MASSLESS
from scipy.stats import skew

from lensflow.sims.flat import FlatSimulator, simulate_maps
from lensflow.sims.theory import PLANCK18, ccl_cosmology, convergence_cl, hilbert2011_shift, parse_sources
from lensflow.stats import ARCMIN

# Planck 2018 without the massive neutrino: CAMB runs 5x faster, and nothing here depends on it.
COSMO = PLANCK18_MASSLESS
NPIX, PIX = 128, 1.64
N_MAPS = 500


# --------------------------------------------------------------------------------------------
# Theory
# --------------------------------------------------------------------------------------------


def _limber_single_plane(ell: np.ndarray, z_s: float) -> np.ndarray:
    """C_ℓ^κκ = ∫ dχ q(χ)²/χ² P_NL((ℓ+½)/χ, z), q = 3/2 Ω_m (H0/c)² χ(χ_s-χ)/χ_s (1+z), with pyccl's
    distances and halofit P(k) but none of its tracer machinery; times the κ prefactor [ℓ(ℓ+1)/(ℓ+½)²]²."""
    import pyccl as ccl

    cosmo = ccl_cosmology(COSMO)
    chi_s = ccl.comoving_radial_distance(cosmo, 1 / (1 + z_s))
    chi = np.linspace(1.0, chi_s, 3000)
    a = ccl.scale_factor_of_chi(cosmo, chi)
    q = 1.5 * cosmo["Omega_m"] * (cosmo["h"] * 100 / 299792.458) ** 2 * chi * (chi_s - chi) / chi_s / a
    out = []
    for l in ell:
        k = (l + 0.5) / chi
        pk = np.array([ccl.nonlin_matter_power(cosmo, kk, aa) for kk, aa in zip(k, a, strict=True)])
        out.append(np.trapezoid(q**2 / chi**2 * pk, chi) * (l * (l + 1) / (l + 0.5) ** 2) ** 2)
    return np.asarray(out)


def test_single_plane_spectrum_matches_an_independent_limber_integral():
    ell = np.array([30.0, 300.0, 3000.0])
    ref = _limber_single_plane(ell, 1.0)
    got = convergence_cl(ell, COSMO, 1.0)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, rtol=5e-3)
    # order of magnitude check against the literature: ℓ²C_ℓ/2π ~ 1e-4 at ℓ ~ 1000 for z_s = 1
    band = 1000**2 * convergence_cl([1000.0], COSMO, 1.0)[0] / (2 * np.pi)
    assert 3e-5 < band < 3e-4


def test_narrow_nz_converges_to_the_source_plane_and_tomography_is_consistent():
    ell = np.geomspace(50, 5000, 6)
    z = np.linspace(0.9, 1.1, 401)
    nz = np.exp(-0.5 * ((z - 1.0) / 0.005) ** 2)
    np.testing.assert_allclose(convergence_cl(ell, COSMO, (z, nz)), convergence_cl(ell, COSMO, 1.0), rtol=5e-3)

    broad = {
        "z": np.linspace(0.0, 2.0, 200).tolist(),
        "nz": (np.linspace(0, 2, 200) ** 2 * np.exp(-np.linspace(0, 2, 200) / 0.3)).tolist(),
    }
    cl = convergence_cl(ell, COSMO, [0.5, 1.0, broad])
    assert cl.shape == (3, 3, ell.size)
    np.testing.assert_array_equal(cl, np.swapaxes(cl, 0, 1))
    for i in range(ell.size):  # each ℓ's covariance matrix is positive definite
        assert np.all(np.linalg.eigvalsh(cl[:, :, i]) > 0)
    assert np.all(cl[0, 0] < cl[1, 1])  # more lensing for the farther plane
    np.testing.assert_allclose(cl[1, 1], convergence_cl(ell, COSMO, 1.0), rtol=1e-10)


def test_linear_spectrum_scales_as_sigma8_squared():
    ell = np.array([20.0, 200.0])
    lo = convergence_cl(ell, COSMO, 1.0, nonlinear=False)
    hi = convergence_cl(ell, {**COSMO, "sigma_8": 0.9}, 1.0, nonlinear=False)
    np.testing.assert_allclose(hi / lo, (0.9 / COSMO["sigma_8"]) ** 2, rtol=1e-3)
    nl = convergence_cl([3000.0], COSMO, 1.0)
    assert nl[0] > 2 * convergence_cl([3000.0], COSMO, 1.0, nonlinear=False)[0]  # halofit boost on small scales


def test_hilbert_shift_formula():
    import glass

    zs = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(hilbert2011_shift(zs), [glass.lognormal_shift_hilbert2011(z) for z in zs])
    assert hilbert2011_shift(1.0)[0] == pytest.approx(0.008 + 0.029 - 0.0079 + 0.00065)
    z = np.linspace(0.0, 2.0, 2001)
    flat = hilbert2011_shift((z, np.ones_like(z)))[0]
    ref = np.mean(z * (8e-3 + z * (2.9e-2 + z * (-7.9e-3 + z * 6.5e-4))))
    assert flat == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({k: v for k, v in COSMO.items() if k != "sigma_8"}, "missing"),
        ({**COSMO, "sigma8": 0.8}, "unknown keys"),
        ({**COSMO, "Omega_b": 0.5}, "Omega_b"),
        ({**COSMO, "h": -0.7}, "positive"),
    ],
)
def test_bad_cosmology_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        convergence_cl([100.0], bad, 1.0)


@pytest.mark.parametrize("bad", [-1.0, "one", [], [[0.1, 0.2, 0.3]], {"z": [0, 1]}])
def test_bad_sources_are_rejected(bad):
    with pytest.raises(ValueError, match="z_source"):
        parse_sources(bad)


# --------------------------------------------------------------------------------------------
# Flat-sky maps: power spectra
# --------------------------------------------------------------------------------------------


def _cl_on(ell: np.ndarray, zs: list[float]) -> np.ndarray:
    """Theory [C, C, *ell.shape], interpolated log-log from 1000 exact values (error < 1e-5)."""
    s = np.geomspace(max(ell[ell > 0].min(), 1.0) / 1.01, ell.max() * 1.01, 1000)
    cl = convergence_cl(s, COSMO, zs).reshape(len(zs), len(zs), -1)
    out = np.zeros((len(zs), len(zs), *ell.shape))
    pos = ell > 0
    for i in range(len(zs)):
        for j in range(len(zs)):
            out[i, j, pos] = np.exp(np.interp(np.log(ell[pos]), np.log(s), np.log(cl[i, j])))
    return out


def _expected_crop_power(xi: np.ndarray, n: int, d: float) -> np.ndarray:
    """E[Δ²|FFT(κ_crop)|²/n²] on the n x n crop of a periodic field with pixel covariance xi [M, M].

    E|F(k)|² = Σ_Δ (n-|Δx|)(n-|Δy|) ξ(Δ) e^{-ik·Δ}: the theory seen through the crop's window, i.e. the
    theory binned with the same mode weights as the measurement.
    """
    M = xi.shape[0]
    lags = np.arange(-(n - 1), n)
    dx, dy = np.meshgrid(lags, lags, indexing="ij")
    g = np.zeros((n, n))
    np.add.at(g, (dx % n, dy % n), (n - abs(dx)) * (n - abs(dy)) * xi[dx % M, dy % M])
    return d**2 / n**2 * np.fft.fft2(g).real


def _bins(n: int, d: float, nbins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Bin index per FFT mode of an n x n map: log bins from 2ℓ_min to ℓ_Nyquist/2."""
    l1 = 2 * np.pi * np.fft.fftfreq(n, d)
    ell = np.hypot(l1[:, None], l1[None, :])
    ell_min, ell_nyq = 2 * np.pi / (n * d), np.pi / d
    edges = np.geomspace(2 * ell_min, ell_nyq / 2, nbins + 1)
    return np.digitize(ell.ravel(), edges) - 1, ell


def _binned(a: np.ndarray, idx: np.ndarray, nbins: int = 10) -> np.ndarray:
    a = a.reshape(*a.shape[:-2], -1)
    return np.stack([a[..., idx == b].mean(-1) for b in range(nbins)], axis=-1)


@pytest.fixture(scope="module")
def tomo_theory():
    """Periodic-grid (2N) pixel covariance of the 2-channel theory, from convergence_cl only."""
    zs = [0.5, 1.0]
    d = PIX * ARCMIN
    M = 2 * NPIX
    l1 = 2 * np.pi * np.fft.fftfreq(M, d)
    ell = np.hypot(l1[:, None], l1[None, :])
    P = _cl_on(ell, zs)
    P[..., 0, 0] = 0.0
    xi = np.fft.ifft2(P).real / d**2  # [2, 2, M, M]
    return zs, P, xi


@pytest.mark.parametrize("kind", ["gaussian", "lognormal"])
def test_mean_power_spectrum_matches_theory(kind, tomo_theory):
    """500 maps, two tomographic channels: auto and cross spectra within 3 standard errors of the theory
    in every log bin between 2ℓ_min and ℓ_Nyquist/2.

    The maps are non-periodic crops, so the theory is seen through the crop window (mode coupling): the
    expectation is the theory convolved with the window (_expected_crop_power), which differs from the
    bare C_ℓ by 0.5-2% here -- 2-4 standard errors at high ℓ, so the bare C_ℓ would be the wrong
    reference. No pixel window is applied by the simulator (pixels sample the band-limited field), so
    none enters the comparison.
    """
    zs, _, xi = tomo_theory
    d = PIX * ARCMIN
    maps = simulate_maps(N_MAPS, NPIX, PIX, COSMO, zs, kind=kind, seed=0).astype(np.float64)
    assert maps.shape == (N_MAPS, 2, NPIX, NPIX)
    F = np.fft.fft2(maps)
    idx, _ = _bins(NPIX, d)
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        pk = d**2 / NPIX**2 * (F[:, i] * np.conj(F[:, j])).real
        per_map = _binned(pk, idx)
        mean = per_map.mean(0)
        se = per_map.std(0, ddof=1) / np.sqrt(N_MAPS)
        expect = _binned(_expected_crop_power(xi[i, j], NPIX, d), idx)
        pull = (mean - expect) / se
        assert np.all(np.abs(pull) < 3), f"{kind} C^{i}{j}: pulls {np.round(pull, 2)}"


def test_periodic_maps_have_the_bare_theory_spectrum():
    """Periodic tiles have no window: the mean FFT power at every grid mode is C_ℓ itself."""
    d = PIX * ARCMIN
    maps = simulate_maps(N_MAPS, NPIX, PIX, COSMO, 1.0, kind="gaussian", seed=1, periodic=True)[:, 0]
    pk = d**2 / NPIX**2 * np.abs(np.fft.fft2(maps.astype(np.float64))) ** 2
    idx, ell = _bins(NPIX, d)
    per_map = _binned(pk, idx)
    theory = _binned(_cl_on(ell, [1.0])[0, 0], idx)
    pull = (per_map.mean(0) - theory) / (per_map.std(0, ddof=1) / np.sqrt(N_MAPS))
    assert np.all(np.abs(pull) < 3), np.round(pull, 2)


# --------------------------------------------------------------------------------------------
# Flat-sky maps: one-point properties
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lognormal_maps():
    sim = FlatSimulator(NPIX, PIX, COSMO, 1.0, kind="lognormal")
    return sim, sim.generate(N_MAPS, seed=2)


def test_lognormal_one_point_properties(lognormal_maps):
    sim, maps = lognormal_maps
    k = maps[:, 0].astype(np.float64)
    lam = hilbert2011_shift(1.0)[0]
    assert sim.shift[0] == pytest.approx(lam)
    assert k.min() >= -lam
    assert skew(k.ravel()) > 0.5
    # Pixel variance = Σ over the grid's modes of C_ℓ / area (ℓ = 0 excluded), computed here from theory:
    d = PIX * ARCMIN
    M = sim.grid
    l1 = 2 * np.pi * np.fft.fftfreq(M, d)
    ell = np.hypot(l1[:, None], l1[None, :])
    var_theory = _cl_on(ell, [1.0])[0, 0].sum() / (M * d) ** 2
    assert np.mean(k**2) == pytest.approx(var_theory, rel=0.05)
    # ... which is the integral of ℓC_ℓ/2π over the represented modes, up to the square grid's corners
    ring = np.geomspace(2 * np.pi / (M * d), np.pi / d, 2000)
    integral = np.trapezoid(ring * convergence_cl(ring, COSMO, 1.0) / (2 * np.pi), ring)
    assert integral == pytest.approx(var_theory, rel=0.15)


def test_gaussian_maps_are_symmetric_and_lognormal_skewness_grows_with_smaller_shift():
    g = simulate_maps(200, 64, PIX, COSMO, 1.0, kind="gaussian", seed=3)
    assert abs(skew(g.ravel())) < 0.05
    s_default = skew(simulate_maps(200, 64, PIX, COSMO, 1.0, seed=3).ravel())
    s_small = skew(simulate_maps(200, 64, PIX, COSMO, 1.0, seed=3, shift=0.015).ravel())
    assert s_small > s_default > 0


def test_identical_sources_give_identical_channels():
    """A singular 2x2 spectral matrix (same plane twice) must give two copies of one field."""
    m = simulate_maps(4, 64, PIX, COSMO, [1.0, 1.0], seed=5)
    np.testing.assert_allclose(m[:, 0], m[:, 1], rtol=1e-5, atol=1e-7)


def test_reproducible_and_independent_of_batching():
    sim = FlatSimulator(64, PIX, COSMO, 1.0)
    a = sim.generate(10, seed=7)
    b = np.concatenate([sim.generate(3, seed=7), sim.generate(7, seed=7, start=3)])
    c = sim.generate(10, seed=7, batch=4)
    assert a.dtype == np.float32 and a.shape == (10, 1, 64, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a, sim.generate(10, seed=8))
    assert not np.allclose(a[0], a[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "poisson"}, "kind"),
        ({"pad": 1.5}, "pad"),
        ({"shift": -0.1}, "shift"),
        ({"npix": 1}, "npix"),
        ({"pixel_arcmin": 0.0}, "pixel_arcmin"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"npix": 32, "pixel_arcmin": PIX, "cosmology": COSMO, "z_source": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        FlatSimulator(**args)


def test_custom_spectrum_on_an_odd_periodic_grid():
    """A power law C_ℓ = 1e-9 (ℓ/1000)^-2 given directly, on an odd grid (no Nyquist column): the mean FFT
    power is C_ℓ at every grid mode, checked in bins against the analytic law."""
    n, pix = 63, 2.0
    d = pix * ARCMIN

    def power_law(ell):
        return 1e-9 * (ell / 1000.0) ** -2.0

    sim = FlatSimulator(n, pix, kind="gaussian", periodic=True, cl=power_law)
    maps = sim.generate(400, seed=4)[:, 0].astype(np.float64)
    pk = d**2 / n**2 * np.abs(np.fft.fft2(maps)) ** 2
    idx, ell = _bins(n, d, nbins=6)
    per_map = _binned(pk, idx, 6)
    theory = _binned(np.where(ell > 0, power_law(np.maximum(ell, 1.0)), 0.0), idx, 6)
    pull = (per_map.mean(0) - theory) / (per_map.std(0, ddof=1) / np.sqrt(400))
    assert np.all(np.abs(pull) < 3), np.round(pull, 2)
    ell_pos = ell[ell > 0]
    assert np.mean(maps**2) == pytest.approx(power_law(ell_pos).sum() / (n * d) ** 2, rel=0.03)


def test_the_config_cosmology_is_the_library_default():
    """conf/cosmology/planck18.yaml (the one Planck block of the configs) takes sims.theory.PLANCK18, and every
    simulator config takes it."""
    from helpers.config import plain

    from lensflow.simulation.spec import SIM_KEYS

    assert plain("simulate")["sim"]["cosmology"] == PLANCK18
    for name in ("gaussian_flat", "lognormal_flat", "lognormal_fullsky"):
        sim = plain("simulate", f"sim={name}")["sim"]
        assert sim["cosmology"] == PLANCK18, name
        assert set(sim) == set(SIM_KEYS[sim["backend"]]), name
