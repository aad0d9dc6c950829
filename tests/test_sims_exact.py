"""FlatSimulator.log_prob against references that share none of its code.

- brute force: the covariance summed mode by mode (cosines, no FFT) and ``scipy.stats.multivariate_normal``
  with the lognormal Jacobian written out, on 6x6 maps, for both kinds, crops and tiles, 1 and 2 channels;
- the generator itself: the empirical covariance of simulated maps equals the covariance the density uses;
- the analytic entropy: the sample mean of -log p over simulated maps equals ½ log det(2πe Σ) (+ the lognormal
  term), with Σ from the brute-force route.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from lensflow.sims.flat import FlatSimulator

N = 6


def _cl(channels: int):
    amp = np.array([[1.0, 0.7], [0.7, 1.6]])[:channels, :channels]

    def cl(ell: np.ndarray) -> np.ndarray:
        shape = 2e-9 * (1.0 + (ell / 2000.0) ** 2) ** -1.1
        return amp[:, :, None] * shape[None, None] if channels > 1 else shape

    return cl


def _sim(kind: str, periodic: bool, channels: int) -> FlatSimulator:
    z = [0.8, 1.5][:channels]
    return FlatSimulator(N, 3.28, None, z, kind=kind, periodic=periodic, cl=_cl(channels))


def _brute_covariance(sim: FlatSimulator) -> np.ndarray:
    """Σ[(i,x1,y1),(j,x2,y2)] = (1/M²) Σ_k S_ij(k) cos(k·Δ), mode by mode over the full grid, from the filter."""
    M, C = sim.grid, sim.channels
    f = sim._filter.astype(np.float64)  # [C, C, M, M//2+1]
    half = M // 2 + 1
    cov = np.zeros((C, N, N, C, N, N))
    x = np.arange(N)
    dx = x[:, None, None, None] - x[None, None, :, None]  # (x1, ·, x2, ·)
    dy = x[None, :, None, None] - x[None, None, None, :]  # (·, y1, ·, y2)
    for kx in range(M):
        for ky in range(M):
            # the full grid's mode (kx, ky) has the filter of its half-plane representative
            rx, ry = (kx, ky) if ky < half else ((-kx) % M, M - ky)
            s = f[:, :, rx, ry] @ f[:, :, rx, ry].T
            phase = np.cos(2 * np.pi * (kx * dx + ky * dy) / M)
            cov += s[:, None, None, :, None, None] * phase[None, :, :, None, :, :]
    return (cov / M**2).reshape(C * N * N, C * N * N)


def _gauss(g: np.ndarray, cov: np.ndarray) -> np.ndarray:
    # On tiles the field has null modes: float32 maps sit ~1e-8 off that subspace, where scipy says -inf, so the
    # reference evaluates the density on the subspace at the projection of g onto it.
    w, u = np.linalg.eigh(cov)
    keep = u[:, w > 1e-12 * w.max()]
    g = g @ keep @ keep.T
    return multivariate_normal(np.zeros(g.shape[1]), cov, allow_singular=True).logpdf(g)


def _brute_log_prob(sim: FlatSimulator, maps: np.ndarray, cov: np.ndarray) -> np.ndarray:
    x = maps.astype(np.float64).reshape(maps.shape[0], -1)
    if sim.kind == "gaussian":
        return _gauss(x, cov)
    lam = np.repeat(np.asarray(sim.shift, float), N * N)
    sig2 = np.repeat(np.asarray(sim._sigma2, float), N * N)
    g = np.log(1.0 + x / lam) + sig2 / 2
    return _gauss(g, cov) - np.log(x + lam).sum(1)


CASES = [(k, p, c) for k in ("gaussian", "lognormal") for p in (False, True) for c in (1, 2)]


@pytest.mark.parametrize(("kind", "periodic", "channels"), CASES)
def test_log_prob_equals_brute_force_multivariate_normal(kind, periodic, channels):
    sim = _sim(kind, periodic, channels)
    maps = sim.generate(40, seed=3)
    got = sim.log_prob(maps)
    want = _brute_log_prob(sim, maps, _brute_covariance(sim))
    assert got.shape == (40,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(("kind", "periodic", "channels"), [("gaussian", False, 2), ("lognormal", True, 1)])
def test_generated_maps_have_the_covariance_the_density_uses(kind, periodic, channels):
    sim = _sim(kind, periodic, channels)
    maps = sim.generate(60_000, seed=11).astype(np.float64)
    g = maps if kind == "gaussian" else np.log1p(maps / np.asarray(sim.shift)[None, :, None, None])
    g = g.reshape(g.shape[0], -1)
    emp = np.cov(g, rowvar=False)
    cov = _brute_covariance(sim)
    sd = np.sqrt(np.outer(np.diag(cov), np.diag(cov)) + cov**2) / math.sqrt(g.shape[0])  # SE of a covariance
    z = np.abs(emp - cov) / sd
    assert z.max() < 5.5, z.max()


@pytest.mark.parametrize(("kind", "periodic"), [("gaussian", False), ("lognormal", False), ("lognormal", True)])
def test_mean_negative_log_prob_is_the_analytic_entropy(kind, periodic):
    sim = _sim(kind, periodic, 1)
    nlp = -sim.log_prob(sim.generate(6000, seed=5))
    cov = _brute_covariance(sim)
    w = np.linalg.eigvalsh(cov)
    w = w[w > 1e-12 * w.max()]
    h = 0.5 * (np.log(w).sum() + w.size * (1 + math.log(2 * math.pi)))
    if kind == "lognormal":
        h += N * N * (math.log(sim.shift[0]) - sim._sigma2[0] / 2)
    se = nlp.std() / math.sqrt(nlp.size)
    assert abs(nlp.mean() - h) < 4 * se, (nlp.mean(), h, se)
    assert abs(sim.entropy() - h) < 1e-6 * abs(h)


def test_periodic_tiles_report_their_null_modes():
    # the target carries no power at ℓ = 0, so every tile sums to zero (Gaussian) or has a fixed Σ log(κ+λ)
    sim = _sim("gaussian", True, 1)
    sim.log_prob(sim.generate(2, seed=0))
    assert sim.likelihood.null_modes == 1


def test_bad_maps_give_one_line():
    sim = _sim("lognormal", False, 1)
    good = sim.generate(2, seed=0)
    with pytest.raises(ValueError, match=r"maps must have shape \[n, 1, 6, 6\]") as e:
        sim.log_prob(good[:, :, :5])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"maps must have shape \[n, 1, 6, 6\]"):
        sim.log_prob(np.concatenate([good, good], axis=1))
    bad = good.copy()
    bad[0, 0, 2, 3] = -1.01 * sim.shift[0]
    with pytest.raises(ValueError, match=r"κ <= -λ") as e:
        sim.log_prob(bad)
    assert "\n" not in str(e.value)
    nan = good.copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sim.log_prob(nan)


def test_one_map_without_batch_axis_is_accepted():
    sim = _sim("gaussian", False, 1)
    m = sim.generate(1, seed=2)
    assert sim.log_prob(m[0]).shape == (1,) and sim.log_prob(m[0])[0] == sim.log_prob(m)[0]


# --------------------------------------------------------------------------------------------
# The truth behind a store: rebuilt from the provenance that `simulate` writes
# --------------------------------------------------------------------------------------------


def _simulated_store(tmp_path, *overrides):
    from hydra import compose, initialize_config_module

    from lensflow.simulation import simulate

    out = tmp_path / "s.h5"
    with initialize_config_module(config_module="lensflow.conf", version_base="1.3"):
        cfg = compose(
            config_name="simulate",
            overrides=[
                "npix=8",
                "pixel_arcmin=3.28",
                "sim.cosmology.m_nu=0",
                "progress=false",
                f"out={out}",
                *overrides,
            ],
        )
    return simulate(cfg)


def test_store_truth_is_the_simulator_that_wrote_the_store(tmp_path):
    from lensflow.mapstore import open_store
    from lensflow.sims.theory import PLANCK18
    from lensflow.sims.truth import StoreTruth

    st = open_store(_simulated_store(tmp_path, "n_maps=6", "seed=4"))
    truth = StoreTruth(st.meta, str(st.path))
    maps = st.read()
    direct = FlatSimulator(8, 3.28, {**PLANCK18, "m_nu": 0.0}, 1.0, kind="lognormal")
    np.testing.assert_array_equal(direct.generate(6, seed=4), maps)  # the same simulator ...
    np.testing.assert_allclose(truth.log_prob(maps), direct.log_prob(maps), rtol=1e-12)  # ... and its density


def test_store_truth_of_a_grid_store_scores_each_map_at_its_node(tmp_path):
    from lensflow.mapstore import open_store
    from lensflow.sims.theory import PLANCK18
    from lensflow.sims.truth import StoreTruth

    path = _simulated_store(tmp_path, "n_maps=3", "sim=gaussian_flat", "+grid={sigma_8:[0.7,0.9]}")
    st = open_store(path)
    truth = StoreTruth(st.meta, str(path))
    maps, params = st.read(), st.read_params()
    got = truth.log_prob(maps, params)
    for s8, rows in ((0.7, slice(0, 3)), (0.9, slice(3, 6))):
        sim = FlatSimulator(8, 3.28, {**PLANCK18, "m_nu": 0.0, "sigma_8": s8}, 1.0, kind="gaussian")
        np.testing.assert_allclose(got[rows], sim.log_prob(maps[rows]), rtol=1e-12)
    # at another θ the same maps are less likely under the wrong amplitude
    assert truth.log_prob(maps[:3], np.full((3, 1), 0.7)).sum() > truth.log_prob(maps[:3], np.full((3, 1), 0.9)).sum()


def test_a_store_without_a_flat_simulation_has_no_truth(tmp_path):
    from lensflow.mapstore import StoreMeta
    from lensflow.sims.truth import StoreTruth

    mock = StoreMeta(pixel_arcmin=3.28, source_redshifts=(1.0,), kind="mock", extra={"seed": 0})
    with pytest.raises(
        ValueError, match=r"mocks.h5: no exact likelihood: the store was not written by a built-in flat"
    ):
        StoreTruth(mock, "mocks.h5")
    ingested = StoreMeta(pixel_arcmin=3.28, source_redshifts=(1.0,), extra={"source": "MassiveNuS"})
    with pytest.raises(ValueError, match="no exact likelihood"):
        StoreTruth(ingested, "nbody.h5")
