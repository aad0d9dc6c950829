"""The rank-Gaussianized peak test (lensflow.compare.gaussianity): no residual for a pointwise transform of a
Gaussian field, a clear one for a field with halos (an independent toy: Gaussian field plus Poisson blobs)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cosmology import PLANCK18_MASSLESS
from scipy.special import ndtr

from lensflow.compare.gaussianity import gaussian_twin, peak_excess, rank_gaussianize
from lensflow.sims.flat import simulate_maps


def test_rank_gaussianize_is_pointwise_and_standard_normal(rng):
    x = rng.standard_normal((50, 1, 8, 8))
    y = rank_gaussianize(np.exp(3 * x))  # a monotone transform is undone up to the ranks' discreteness
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.999  # 3,200 samples: the ranks' Φ⁻¹ scatter ~3e-4
    np.testing.assert_array_equal(np.argsort(y.ravel()), np.argsort(x.ravel()))  # order kept exactly
    assert abs(y.mean()) < 1e-12 and y.std() == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="NaN"):
        rank_gaussianize(np.full((2, 1, 4, 4), np.nan))


def test_gaussian_twin_has_the_maps_covariance(rng):
    maps = simulate_maps(400, 16, 4.0, PLANCK18_MASSLESS, 1.0, kind="gaussian", seed=2)
    twin = gaussian_twin(maps, 4000, seed=1)
    # the variance of the map mean (the crop's largest scale) and the pixel variance agree within their errors
    assert twin.std() == pytest.approx(maps.std(), rel=0.03)
    assert twin.mean((1, 2, 3)).std() == pytest.approx(maps.mean((1, 2, 3)).std(), rel=0.15)


def test_lognormal_maps_have_no_residual_and_halos_have_one(rng):
    ln = simulate_maps(600, 32, 3.28, PLANCK18_MASSLESS, 1.0, kind="lognormal", seed=0)
    assert peak_excess(ln, seed=3)["max_abs_z"] < 4.0
    # halos: Poisson-distributed compact blobs (3 per map on average, 1.5-pixel Gaussian profiles) on a Gaussian
    # field; after rank Gaussianization their peaks stay (a pointwise map cannot undo a localised profile)
    g = simulate_maps(600, 32, 3.28, PLANCK18_MASSLESS, 1.0, kind="gaussian", seed=1).astype(np.float64)
    yy, xx = np.mgrid[:32, :32]
    for m in g:
        for _ in range(rng.poisson(3)):
            cy, cx = rng.uniform(0, 32, 2)
            m[0] += 2.5 * g.std() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
    assert peak_excess(g, seed=3)["max_abs_z"] > 8.0
    assert 20 * ndtr(-4.0) < 1e-3  # the lognormal bound above: < 1e-3 false alarms over 10 two-sided bins
