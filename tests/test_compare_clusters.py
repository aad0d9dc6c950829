"""Grouped maps (many maps cut from few N-body boxes): clustered errors, calibrated verdicts, power kept.

The reference is a random-effects model, x = √ρ u_g + √(1 − ρ) e (u shared by a group's maps), mixed across bins
and made skewed and discrete in some bins like peak counts; the candidate draws the same marginal independently
per map, like an emulator's mocks. Its group variance is known exactly, so the clustered variance and the
correlation noise floor are checked against brute-force replicates, not against the code's own output.
"""

from __future__ import annotations

import numpy as np
import pytest

from lensflow.compare import compare
from lensflow.compare.clusters import clustered_variance, effective_maps
from lensflow.compare.metrics import Moments, correlation_of

F = 20
MIX = np.random.default_rng(99).normal(size=(F, F)) * 0.3 + np.eye(F)


def _maps(rng: np.random.Generator, n_groups: int, per_group: int, rho: float, shift: float = 0.0) -> np.ndarray:
    """[n_groups · per_group, F]; ``per_group`` = 1 gives independent maps of the same marginal."""
    n = n_groups * per_group
    u = np.repeat(rng.normal(size=(n_groups, F)), per_group, axis=0)
    x = (np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.normal(size=(n, F))) @ MIX.T
    x[:, :4] = np.exp(0.5 * x[:, :4])  # skewed bins
    x[:, 4:8] = rng.poisson(0.2 * np.exp(0.3 * x[:, 4:8]))  # sparse counts, like high peaks
    x[:, 8] += shift
    return x


def _sets(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"cl": x[:, :10], "peaks": x[:, 10:]}


def test_clustered_variance_is_s2_over_n_for_independent_maps_and_the_group_variance_for_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    np.testing.assert_allclose(clustered_variance(x), x.var(axis=0, ddof=1) / 50, rtol=1e-12)
    # random effects with known variance of the mean: (ρ n + 1 − ρ)/(G n) per unit-variance bin
    n_groups, per, rho = 30, 10, 0.3
    groups = np.repeat(np.arange(n_groups), per)
    exact = (rho * per + 1 - rho) / (n_groups * per)
    est, worth = [], []
    for k in range(300):
        r = np.random.default_rng([1, k])
        u = np.repeat(r.normal(size=(n_groups, 1)), per, axis=0)
        x = np.sqrt(rho) * u + np.sqrt(1 - rho) * r.normal(size=(n_groups * per, 1))
        est.append(clustered_variance(x, groups))
        worth.append(effective_maps(x, groups))
    assert np.mean(est) == pytest.approx(exact, rel=0.06)
    assert np.median(worth) == pytest.approx(1 / exact, rel=0.15)  # 3.7 maps' worth per box of 10


@pytest.mark.slow
def test_grouped_reference_against_independent_mocks_fails_at_the_nominal_rate_where_permutations_do_not():
    pairs, clustered, permuted, lines = 20, 0, 0, []
    for k in range(pairs):
        rng = np.random.default_rng([2, k])
        ref, cand = _maps(rng, 25, 20, 0.3), _maps(rng, 500, 1, 0.3)
        groups = (np.repeat(np.arange(25), 20), None)
        res = compare(_sets(ref), _sets(cand), {"permutations": 400}, seed=k, groups=groups)
        clustered += not res["pass"]
        lines += res["failures"]
        if k < 10:  # the same pairs as if the maps were independent
            permuted += not compare(_sets(ref), _sets(cand), {"permutations": 400}, seed=k)["pass"]
    assert res["calibration"]["method"] == "cluster bootstrap"
    assert res["omnibus"]["n_reference"] == 25 and res["omnibus"]["one_map_per_group"]
    assert clustered <= 2, (clustered, lines[:5])  # nominal ~1 %: P(> 2 of 20 | 1 %) = 0.1 %
    assert permuted >= 5, permuted


def test_a_real_shift_is_still_detected_with_grouped_maps():
    rng = np.random.default_rng(5)
    ref, cand = _maps(rng, 25, 20, 0.1), _maps(rng, 500, 1, 0.1, shift=0.6)
    res = compare(_sets(ref), _sets(cand), {"permutations": 400}, seed=1, groups=(np.repeat(np.arange(25), 20), None))
    assert not res["pass"]
    assert any("cl: mean" in f for f in res["failures"]), res["failures"]


def test_the_correlation_noise_floor_of_grouped_maps_matches_brute_force():
    # two independent grouped sets of one distribution: the rms of their correlation difference, over replicates
    n_groups, per, rho = 20, 25, 0.3
    groups = np.repeat(np.arange(n_groups), per)
    rms2, floors, floors_iid = [], [], []
    for k in range(25):
        rng = np.random.default_rng([3, k])
        a, b = _maps(rng, n_groups, per, rho)[:, 10:], _maps(rng, n_groups, per, rho)[:, 10:]
        ma, mb = Moments.of(a), Moments.of(b)
        c = correlation_of(ma, mb, None, (groups, groups + n_groups))
        rms2.append(c["rms"] ** 2)
        floors.append(c["noise_floor"])
        floors_iid.append(correlation_of(ma, mb, None)["noise_floor"])
    brute = float(np.sqrt(np.mean(rms2)))
    assert np.mean(floors) == pytest.approx(brute, rel=0.15)
    assert np.mean(floors_iid) < 0.8 * brute  # ignoring the groups underestimates it


def test_group_ids_of_the_wrong_length_are_one_line():
    x = np.zeros((10, 3)) + np.arange(10)[:, None]
    with pytest.raises(ValueError, match=r"^reference groups: 9 ids for 10 maps$"):
        compare({"s": x}, {"s": x}, groups=(np.repeat(np.arange(3), 3), None))
