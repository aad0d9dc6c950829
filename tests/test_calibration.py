"""Validation verdicts are calibrated at every sample size, and they detect named departures.

Two independent sets of the same lognormal simulations, measured with validate's default statistics, must
fail no more often than the nominal family-wise level (about 1 % for the whole verdict: 0.27 % per
criterion), also with a 40-map reference against 400 candidates, where the analytic thresholds failed 5 of
16 pairs. Fifty pairs tell that apart from the old ~30 % (and from 10 %: P(≤ 2 of 50 | 10 %) = 11 %).
"""

from __future__ import annotations

import numpy as np
import pytest

from lensflow.compare import Tolerances, compare
from lensflow.mapstore import StoreMeta
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18
from lensflow.validation import statistics_of, summary_config_for

pytestmark = pytest.mark.usefixtures("one_thread")

COSMO = {**PLANCK18, "m_nu": 0.0}
META = StoreMeta(pixel_arcmin=3.28, source_redshifts=(1.0,))


def _sim(npix: int, **changes) -> FlatSimulator:
    kind = changes.pop("kind", "lognormal")
    return FlatSimulator(npix, 3.28, {**COSMO, **changes}, 1.0, kind=kind)


def _verdict(ref: np.ndarray, cand: np.ndarray, seed: int, tol: Tolerances | None = None) -> dict:
    sc = summary_config_for({}, META, ref, seed=seed)
    a = statistics_of(ref, sc, seed=seed)
    b = statistics_of(cand, sc, seed=seed + 1)
    return compare(a, b, tol, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize(("n_ref", "n_cand", "pairs"), [(40, 400, 50), (1000, 1000, 50)])
def test_independent_sets_of_one_distribution_fail_at_the_nominal_rate(n_ref, n_cand, pairs):
    sim = _sim(32)
    fails, lines = 0, []
    for k in range(pairs):
        ref = sim.generate(n_ref, seed=[7, k, 0])
        cand = sim.generate(n_cand, seed=[7, k, 1])
        res = _verdict(ref, cand, seed=k, tol=Tolerances(permutations=400))
        fails += not res["pass"]
        lines += res["failures"]
        # every z that can decide is finite, zero-count reference bins included
        for s in res["statistics"].values():
            assert np.isfinite(s["z_mean_pooled"]).all()
    assert fails <= 2, (fails, lines[:5])


def test_a_zero_count_reference_bin_neither_gives_an_infinite_z_nor_decides():
    rng = np.random.default_rng(3)
    ref = {"peaks": rng.poisson([5.0, 1.0, 0.0], (40, 3)).astype(float)}  # the last bin: no reference counts
    cand = {"peaks": rng.poisson([5.0, 1.0, 0.02], (400, 3)).astype(float)}
    cand["peaks"][:6, 2] = 1.0  # a few candidate counts where the reference has none
    res = compare(ref, cand)
    s = res["statistics"]["peaks"]
    assert s["mean_reference"][2] == 0 and not np.isfinite(s["frac_error_mean"][2])  # reported, ...
    assert np.isfinite(s["z_mean_pooled"]).all()  # ... but the deciding z is finite ...
    assert s["verdict"]["mean"] and s["verdict"]["std"]  # ... and 6 counts in 400 maps decide nothing
    assert all("inf" not in f for f in res["failures"])


@pytest.mark.slow
def test_sigma8_two_percent_high_fails_at_1000_vs_1000():
    ref = _sim(64).generate(1000, seed=[8, 0])
    cand = _sim(64, sigma_8=COSMO["sigma_8"] * 1.02).generate(1000, seed=[8, 1])
    res = _verdict(ref, cand, seed=0)
    assert not res["pass"], res["failures"]


@pytest.mark.slow
def test_gaussian_fields_with_the_lognormal_spectrum_fail():
    ref = _sim(64).generate(1000, seed=[9, 0])
    cand = _sim(64, kind="gaussian").generate(1000, seed=[9, 1])
    res = _verdict(ref, cand, seed=0)
    assert not res["pass"]
    assert any(f.startswith(("pdf", "peaks", "minima", "moments", "v0", "v1", "v2")) for f in res["failures"])


def test_bad_calibration_settings_are_one_line():
    for kw, match in (
        ({"permutations": 0}, "tolerances.permutations must be an integer >= 1"),
        ({"permutations": -5}, "tolerances.permutations must be an integer >= 1"),
        ({"permutations": 2.5}, "tolerances.permutations must be an integer"),
        ({"omnibus_sigma": -1.0}, "tolerances.omnibus_sigma"),
        ({"mean_rtol": -0.1}, "tolerances.mean_rtol"),
        ({"chi2_pvalue": 2.0}, "tolerances.chi2_pvalue"),
    ):
        with pytest.raises(ValueError, match=match) as e:
            Tolerances(**kw)
        assert "\n" not in str(e.value)
