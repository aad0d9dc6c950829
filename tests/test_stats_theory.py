"""lensflow.stats on Gaussian random fields against published theory.

The fields are synthesized by ``helpers.fields``, independently of the library, by filtering white noise
in Fourier space (periodic maps), so their power spectrum, and with it σ0, σ1, σ2, is known:
σ_i² = (1/A) Σ_modes ℓ^(2i) C(ℓ) over the discrete modes of the map.  The theory curves use the σ_i
*measured* on the very maps, exactly, from their Fourier modes (no finite differences): that removes
the sample variance of a few maps' variance (a 1 % error on σ0 is a 4 % error on V0 at ν = 2), while
the spectrum's σ_i check that the maps are what they should be.  Conventions: σ1² = <|∇κ|²> and
σ2² = <(∇²κ)²> (total, not per component).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.fields import cl_grf, ell_modes
from scipy.integrate import quad
from scipy.special import erfc
from scipy.stats import norm

import lensflow.stats as S
from lensflow.stats import ARCMIN

pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmas(npix: int, pix_arcmin: float, power: np.ndarray) -> tuple[float, float, float]:
    """σ0, σ1 (per arcmin), σ2 (per arcmin²) of a periodic field with per-mode power (sr) on rfft2 modes."""
    ell, mult = ell_modes(npix, pix_arcmin)
    area = (npix * pix_arcmin * ARCMIN) ** 2
    s = [math.sqrt((mult * ell ** (2 * i) * power).sum() / area) for i in range(3)]
    return s[0], s[1] * ARCMIN, s[2] * ARCMIN**2


def _measured_sigmas(maps: np.ndarray, pix_arcmin: float) -> np.ndarray:
    """σ0, σ1 (per arcmin), σ2 (per arcmin²) of periodic maps, pooled, from their Fourier modes:
    σ_i² = <Σ_k |k|^(2i) |F_k|²> / N_pix², the exact moments of the band-limited field."""
    npix = maps.shape[-1]
    k = 2 * np.pi * np.hypot(np.fft.fftfreq(npix, pix_arcmin)[:, None], np.fft.rfftfreq(npix, pix_arcmin)[None, :])
    mult = np.full(npix // 2 + 1, 2.0)
    mult[0] = mult[-1] = 1.0
    p = sum((np.abs(np.fft.rfft2(maps[i : i + 16])) ** 2).sum(axis=0) for i in range(0, len(maps), 16))
    p = p * mult / (len(maps) * npix**4)
    return np.sqrt([(p * k ** (2 * i)).sum() for i in range(3)])


def _lensing_like(ell: np.ndarray, smooth_arcmin: float | None = None) -> np.ndarray:
    """C_ℓ ∝ ℓ^-1 (roughly the κ spectrum at ℓ ~ 10^3), optionally times a Gaussian window |W|²."""
    out = np.zeros_like(ell)
    pos = ell > 0
    out[pos] = 1e-9 * (ell[pos] / 1000.0) ** -1.0
    if smooth_arcmin is not None:
        out *= np.exp(-((ell * smooth_arcmin * ARCMIN) ** 2))
    return out


def test_power_spectrum_recovers_the_input_within_gaussian_errors():
    npix, pix, nmaps = 128, 1.0, 200
    cl_in = lambda ell: _lensing_like(ell) * (1 + (ell / 4000.0) ** 2) ** -1  # noqa: E731
    maps = cl_grf(nmaps, npix, pix, cl_in, np.random.default_rng(0))
    edges = S.default_ell_edges(npix, pix)
    ell, cl = S.power_spectrum(maps, pix, edges)
    _, n_modes = S.ell_modes(npix, pix, edges)
    # expected bandpower: the input averaged over the bin's modes of the full plane (computed here)
    d = pix * ARCMIN
    ell_full = 2 * np.pi * np.hypot(*np.meshgrid(np.fft.fftfreq(npix, d), np.fft.fftfreq(npix, d)))
    expected = np.array(
        [cl_in(ell_full[(ell_full > lo * (1 + 1e-12)) & (ell_full <= hi * (1 + 1e-12))]).mean()
         for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    )  # fmt: skip
    sigma = expected * np.sqrt(2.0 / n_modes)  # per map
    pull = (cl.mean(axis=0) - expected) / (sigma / math.sqrt(nmaps))
    assert np.all(np.abs(pull) < 3.0), pull
    # the scatter between maps is the Gaussian one (20 % allows for the estimate's own noise)
    ratio = cl.std(axis=0, ddof=1) / sigma
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    assert np.all(np.diff(ell) > 0) and np.all((ell > edges[:-1]) & (ell <= edges[1:] * (1 + 1e-9)))


def _bond_efstathiou(nu: np.ndarray | float, gamma: float, theta_star: float) -> np.ndarray:
    """2-D Gaussian peak density per unit area and unit ν (Bond & Efstathiou 1987, MNRAS 226, 655,
    appendix; also Bardeen et al. 1986 in 3-D), in the weak-lensing notation of Fan, Shan & Liu
    (2010, ApJ 719, 1408), eqs. (4)-(6):

        n_pk(ν) = 1 / (2π θ*²) · 1/sqrt(2π) · exp(-ν²/2) · G(γ, γν),   θ*² = 2σ1²/σ2²,  γ = σ1²/(σ0σ2)

        G(γ, x) = (x² - γ²) [1 - ½ erfc(x / sqrt(2(1-γ²)))]
                  + x (1-γ²) / sqrt(2π(1-γ²)) · exp(-x² / (2(1-γ²)))
                  + 1/sqrt(3-2γ²) · exp(-x² / (3-2γ²)) · [1 - ½ erfc(x / sqrt(2(1-γ²)(3-2γ²)))]
    """
    x = gamma * np.asarray(nu, dtype=float)
    a = 1.0 - gamma**2
    b = 3.0 - 2.0 * gamma**2
    g = (
        (x * x - gamma**2) * (1.0 - 0.5 * erfc(x / np.sqrt(2 * a)))
        + x * a / np.sqrt(2 * np.pi * a) * np.exp(-x * x / (2 * a))
        + np.exp(-x * x / b) / np.sqrt(b) * (1.0 - 0.5 * erfc(x / np.sqrt(2 * a * b)))
    )
    return np.exp(-0.5 * np.asarray(nu) ** 2) * g / (2 * np.pi * theta_star**2 * np.sqrt(2 * np.pi))


def _check_gaussian_extrema_and_pdf(kappa: np.ndarray, pix: float, expected_sigmas: tuple[float, ...]) -> None:
    """Peaks and minima per unit area against Bond & Efstathiou (1987), the pixel PDF against the
    Gaussian, for periodic Gaussian maps; σ0, σ1, σ2 measured on the maps (module docstring)."""
    nmaps, npix = kappa.shape[0], kappa.shape[-1]
    measured = _measured_sigmas(kappa, pix)
    np.testing.assert_allclose(measured, expected_sigmas, rtol=0.02)  # the maps are what we think
    s0, s1, s2 = measured
    gamma, theta_star = s1**2 / (s0 * s2), math.sqrt(2) * s1 / s2
    # the formula integrates to the total density of maxima of a 2-D Gaussian field,
    # σ2² / (8√3 π σ1²) (Longuet-Higgins 1957): guards against a typo in it
    total = quad(_bond_efstathiou, -12, 12, args=(gamma, theta_star))[0]
    assert total == pytest.approx(s2**2 / (8 * math.sqrt(3) * math.pi * s1**2), rel=1e-8)

    nu_pk = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])  # [3, 4] pooled for counting statistics
    peaks = S.peak_counts(kappa, nu_pk * s0, periodic=True).sum(axis=0)
    minima = S.minima_counts(kappa, -nu_pk[::-1] * s0, periodic=True).sum(axis=0)
    area = (npix * pix) ** 2  # arcmin²; on a periodic map every pixel can be a peak
    expected = (
        nmaps
        * area
        * np.array(
            [
                quad(_bond_efstathiou, a, b, args=(gamma, theta_star))[0]
                for a, b in zip(nu_pk[:-1], nu_pk[1:], strict=True)
            ]
        )
    )
    assert expected.min() > 1000  # Poisson error under 3 %, so 10 % is a real test
    np.testing.assert_allclose(peaks / expected, 1.0, atol=0.10)
    np.testing.assert_allclose(minima[::-1] / expected, 1.0, atol=0.10)  # n_min(ν) = n_pk(-ν)

    nu_pdf = np.linspace(-3.0, 3.0, 13)
    pdf = S.pixel_pdf(kappa, nu_pdf * s0).mean(axis=0)
    gauss = np.diff(norm.cdf(nu_pdf)) / np.diff(nu_pdf) / s0  # bin-averaged density in κ
    np.testing.assert_allclose(pdf / gauss, 1.0, atol=0.03)


def test_noise_peaks_minima_and_pdf_follow_gaussian_theory():
    """Smoothed shape noise, the classic noise-peak case (γ = 1/√2).  The expected σ0, σ1, σ2 follow
    from the input spectrum (white, σ_pix² A_pix per mode) times the exact window of the sampled
    Gaussian kernel, |T(k)|², with T the DFT of the kernel weights built here."""
    npix, pix, sigma_s, nmaps, chunk = 512, 1.0, 3.0, 128, 16
    sigma_e, n_gal = 0.26, 30.0
    # window of the sampled, truncated (4σ), unit-sum kernel, laid on the periodic grid
    r = int(4 * sigma_s / pix + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) * pix / sigma_s) ** 2)
    k1 = np.zeros(npix)
    k1[np.arange(-r, r + 1) % npix] = w / w.sum()
    t1 = np.fft.fft(k1).real
    window = (t1[:, None] * t1[None, : npix // 2 + 1]) ** 2
    sig_pix = S.pixel_noise_sigma(pix, sigma_e, n_gal)
    power = sig_pix**2 * (pix * ARCMIN) ** 2 * window  # per-mode C_ℓ of the smoothed noise
    rng = np.random.default_rng(1)
    kappa = np.concatenate(
        [S.smooth(S.shape_noise((chunk, npix, npix), pix, sigma_e, n_gal, generator=rng), pix, sigma_s, periodic=True)
         for _ in range(nmaps // chunk)]
    )  # fmt: skip
    _check_gaussian_extrema_and_pdf(kappa, pix, _sigmas(npix, pix, power))


def test_lensing_like_peaks_minima_and_pdf_follow_gaussian_theory():
    """A red, lensing-like spectrum C_ℓ ∝ ℓ^-1 through a Gaussian window of 3 pixels (γ ≈ 0.58)."""
    npix, pix, smooth_arcmin, nmaps = 512, 1.0, 3.0, 160
    cl = lambda ell: _lensing_like(ell, smooth_arcmin)  # noqa: E731
    ell, _ = ell_modes(npix, pix)
    rng = np.random.default_rng(3)
    kappa = np.concatenate([cl_grf(16, npix, pix, cl, rng) for _ in range(nmaps // 16)])
    _check_gaussian_extrema_and_pdf(kappa, pix, _sigmas(npix, pix, cl(ell)))


def test_minkowski_functionals_follow_tomita():
    """V0, V1, V2 of a Gaussian field against Tomita (1986, Prog. Theor. Phys. 76, 952) in the
    normalization of Kratochvil et al. (2012, PRD 85, 103513) and Petri et al. (2013, PRD 88, 123002):

        V0(ν) = ½ erfc(ν/√2)
        V1(ν) = 1/(8√2) · (σ1/σ0) · exp(-ν²/2)                 [per arcmin]
        V2(ν) = 1/(2 (2π)^{3/2}) · (σ1/σ0)² · ν exp(-ν²/2)    [per arcmin²]

    with ν = κ/σ0 and σ1² = <|∇κ|²>, measured exactly on the maps.  The field is smooth (Gaussian
    window of 4 pixels), so the central differences underestimate σ1 by ~1 %.
    """
    npix, pix, smooth_arcmin, nmaps = 512, 0.5, 2.0, 32
    cl = lambda ell: _lensing_like(ell, smooth_arcmin)  # noqa: E731
    ell, _ = ell_modes(npix, pix)
    expected_sigmas = _sigmas(npix, pix, cl(ell))
    thresholds = np.linspace(-2.0, 2.0, 21)
    maps = cl_grf(nmaps, npix, pix, cl, np.random.default_rng(2))
    measured = _measured_sigmas(maps, pix)
    np.testing.assert_allclose(measured[:2], expected_sigmas[:2], rtol=0.03)
    s0, s1, _ = measured
    v = np.array([f.mean(axis=0) for f in S.minkowski(maps, thresholds * s0, pix, periodic=True)])
    nu = 0.5 * (thresholds[1:] + thresholds[:-1])
    v0 = 0.5 * erfc(nu / math.sqrt(2))
    v1 = (s1 / s0) / (8 * math.sqrt(2)) * np.exp(-(nu**2) / 2)
    v2 = (s1 / s0) ** 2 / (2 * (2 * math.pi) ** 1.5) * nu * np.exp(-(nu**2) / 2)
    np.testing.assert_allclose(v[0] / v0, 1.0, atol=0.05)
    np.testing.assert_allclose(v[1] / v1, 1.0, atol=0.05)
    # V2 crosses zero at ν = 0: 5 % of its amplitude
    np.testing.assert_allclose(v[2], v2, atol=0.05 * np.abs(v2).max())
    # without periodicity (outer ring dropped) the functionals are the same to within that ring's share
    w = np.array([f.mean(axis=0) for f in S.minkowski(maps, thresholds * s0, pix)])
    for wi, vi in zip(w, v, strict=True):
        np.testing.assert_allclose(wi, vi, rtol=0.03, atol=0.01 * np.abs(vi).max())
