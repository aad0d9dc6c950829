"""Field-level inference: grid posteriors, the exact posterior's coverage, a conditional flow's preferences,
and ``python -m lensflow.infer`` end to end with its bad-input lines."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from helpers.stores import noise_store

from lensflow.flows import Glow
from lensflow.inference.exact import ExactModel
from lensflow.inference.likelihoods import emulator_loglike
from lensflow.inference.posterior import GridPosterior, ParameterGrid, refine_loglike
from lensflow.sims.flat import FlatSimulator

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(ell: np.ndarray) -> np.ndarray:
    return 2e-9 * (1.0 + (ell / 2000.0) ** 2) ** -1.1


def _sim(theta, npix=8, kind="gaussian") -> FlatSimulator:
    """A toy 'cosmology': theta = (amplitude a, tilt n), C_ell = a · base(ell) · (ell/1000)^n."""
    a, n = float(theta[0]), float(theta[1])
    return FlatSimulator(npix, 3.28, None, 1.0, kind=kind, cl=lambda ell: a * _base(ell) * (ell / 1000.0) ** n)


def test_grid_posterior_of_a_gaussian_likelihood_has_its_moments_and_intervals():
    grid = ParameterGrid(("x", "y"), (-3.0, -2.0), (5.0, 6.0), (161, 161))
    nodes = grid.nodes()
    mu, cov = np.array([1.0, 2.0]), np.array([[0.5, 0.2], [0.2, 0.3]])
    d = nodes - mu
    ll = -0.5 * np.einsum("gi,ij,gj->g", d, np.linalg.inv(cov), d)
    post = GridPosterior(grid, ll)
    np.testing.assert_allclose(post.mean(), mu, atol=2e-3)
    np.testing.assert_allclose(post.cov(), cov, atol=2e-3)
    lo, hi = post.interval(0, 0.68)
    assert (lo, hi) == pytest.approx((1.0 - 0.9945 * math.sqrt(0.5), 1.0 + 0.9945 * math.sqrt(0.5)), abs=5e-3)
    # HPD credibility of a point at Mahalanobis distance r in 2-D is 1 - exp(-r²/2)
    r = 1.5
    point = mu + r * np.sqrt(np.diag(cov)) * np.array([1.0, 0.0]) / np.sqrt(1.0 / (1 - 0.2**2 / (0.5 * 0.3)))
    m2 = float((point - mu) @ np.linalg.inv(cov) @ (point - mu))
    assert post.credibility(point) == pytest.approx(1 - math.exp(-m2 / 2), abs=5e-3)
    assert post.figure_of_merit() == pytest.approx(1 / math.sqrt(np.linalg.det(cov)), rel=5e-3)


@pytest.mark.slow
def test_the_exact_posterior_covers_the_truth_at_the_nominal_rate():
    # truths drawn from the uniform prior, one 8² map each, posterior on a 15 x 15 grid from the exact likelihood
    lo, hi = (0.5, -0.6), (1.5, 0.6)
    grid = ParameterGrid(("a", "n"), lo, hi, (15, 15))
    rng = np.random.default_rng(4)
    truths = rng.uniform(lo, hi, (80, 2))
    maps = np.concatenate([_sim(t).generate(1, seed=[5, i]) for i, t in enumerate(truths)])
    model = ExactModel(_sim, ("a", "n"))
    ll = emulator_loglike(model, maps, grid.nodes(), show_progress=False)  # infer's loop, driven by the truth
    cred = np.array([GridPosterior(grid, ll[i]).credibility(truths[i]) for i in range(len(maps))])
    for q in (0.68, 0.95):
        cover, se = (cred <= q).mean(), math.sqrt(q * (1 - q) / len(cred))
        assert abs(cover - q) < 3 * se, (q, cover)
    inside = [GridPosterior(grid, ll[i]).interval(0, 0.95) for i in range(len(maps))]
    assert np.mean([a <= t <= b for (a, b), t in zip(inside, truths[:, 0], strict=True)]) > 0.85


def test_a_conditional_flow_prefers_the_amplitude_its_maps_were_drawn_at():
    torch.manual_seed(0)
    amps = (0.5, 2.0)
    data = [_sim((a, 0.0), npix=16).generate(256, seed=[6, k]) for k, a in enumerate(amps)]
    x = torch.from_numpy(np.concatenate(data))
    c = torch.tensor([[-1.0]] * 256 + [[1.0]] * 256)  # normalised condition
    glow = Glow(1, 16, levels=2, steps=2, hidden=16, cond_dim=1, stationary=True, init_seed=0)
    glow.preprocess.fit(x)
    glow.initialize(x[::2], c[::2])
    opt = torch.optim.Adam(glow.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = glow.bits_per_dim(x[idx], c[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = [torch.from_numpy(_sim((a, 0.0), npix=16).generate(64, seed=[7, k])) for k, a in enumerate(amps)]
    with torch.no_grad():
        lp = [[glow.log_prob(h, torch.full((64, 1), v)).mean().item() for v in (-1.0, 1.0)] for h in held]
    assert lp[0][0] > lp[0][1] and lp[1][1] > lp[1][0], lp


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    from helpers.stores import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("cond"), "cond", cond=("Omega_m", "sigma_8"))


def _infer(run_command, *args):
    from lensflow.infer import main

    return run_command(main, *args, "progress=false", "device=cpu")


def test_infer_writes_posteriors_of_a_conditional_emulator(cond_ckpt, tmp_path, run_command):
    maps = noise_store(tmp_path / "maps.h5", n=6, cond=("Omega_m", "sigma_8"), seed=9)
    out = tmp_path / "post"
    res = _infer(run_command, f"ckpt={cond_ckpt}", f"maps={maps}", f"out={out}", "grid_points=7", "joint=true")
    assert res.code == 0, res.err
    post = json.loads((out / "posterior.json").read_text())
    assert post["param_names"] == ["Omega_m", "sigma_8"]
    assert post["prior"] == {"Omega_m": [0.25, 0.35], "sigma_8": [0.75, 0.85]}  # the training box
    assert len(post["maps"]) == 6 and post["joint"] is not None
    m = post["maps"][0]["emulator"]
    assert len(m["mean"]) == 2 and np.array(m["cov"]).shape == (2, 2) and len(m["interval68"]) == 2
    assert all(0.25 <= v <= 0.35 for v in m["interval95"][0])
    assert (out / "index.html").exists() and list(out.glob("corner_*.png"))
    assert "not available" in post["notes"]["exact"]  # a noise store has no exact likelihood


def test_infer_bad_input_is_one_line(cond_ckpt, tmp_path, run_command, tiny_checkpoint):
    maps = noise_store(tmp_path / "maps.h5", n=4, cond=("Omega_m", "sigma_8"), seed=9)
    other = noise_store(tmp_path / "other.h5", n=4, pixel_arcmin=3.0)
    nan = noise_store(tmp_path / "nan.h5", n=4, cond=("Omega_m", "sigma_8"), seed=9)
    with h5py.File(nan, "r+") as f:
        f["kappa"][1, 0, 3, 3] = np.nan
    out = f"out={tmp_path / 'x'}"
    cases = [
        ([f"ckpt={tiny_checkpoint}", f"maps={maps}", out], "is an unconditional emulator"),
        ([f"ckpt={cond_ckpt}", f"maps={maps}", out, "prior.sigma_8=[0.6,0.8]"], "outside the emulator's training box"),
        ([f"ckpt={cond_ckpt}", f"maps={other}", out], "but the emulator was trained on 1x16² maps of 2 arcmin"),
        ([f"ckpt={cond_ckpt}", f"maps={nan}", out], "NaN"),
        ([f"ckpt={cond_ckpt}", f"maps={maps}", out, "grid_points=1"], "grid_points must be an integer >= 3"),
        ([f"ckpt={cond_ckpt}", f"maps={maps}", out, "grid_points=3", "refine=4"], "refine > 1 needs grid_points >= 4"),
    ]
    for args, match in cases:
        res = _infer(run_command, *args)
        assert res.code == 2, (args, res.err)
        assert len(res.err) == 1 and res.err[0].startswith("error: ") and match in res.err[0], (args, res.err)


def test_a_posterior_narrower_than_a_grid_cell_still_draws(tmp_path):
    # both HPD masses fall in one cell: the contour levels collapse to one (matplotlib refuses repeated levels)
    from lensflow.report.figures import save_figure
    from lensflow.report.posterior import corner_figure

    axes = [np.linspace(0.2, 0.4, 5), np.linspace(0.7, 0.9, 5)]
    spike = np.full((5, 5), 1e-12)
    spike[2, 3] = 1.0
    fig = corner_figure(axes, ["Omega_m", "sigma_8"], {"emulator": spike, "exact": spike.T}, truth=[0.3, 0.85])
    save_figure(fig, tmp_path / "corner.png", 60)
    assert (tmp_path / "corner.png").stat().st_size > 0


def test_a_posterior_narrower_than_a_cell_is_summarised_on_the_refined_grid():
    # the analytic reference: a Gaussian likelihood along a diagonal ridge 0.35 of a grid cell wide (σ across it),
    # as the Ω_m-σ_8 degeneracy of one κ map on a 15² grid over the box
    coarse = ParameterGrid(("x", "y"), (0.0, 0.0), (1.4, 1.4), (15, 15))
    rot = np.array([[1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2)
    mu, cov = np.array([0.613, 0.742]), rot @ np.diag([0.15**2, 0.035**2]) @ rot.T
    inv = np.linalg.inv(cov)

    def ll(nodes):
        d = nodes - mu
        return -0.5 * np.einsum("gi,ij,gj->g", d, inv, d)

    raw = GridPosterior(coarse, ll(coarse.nodes()))
    fine, lls = refine_loglike(coarse, np.stack([ll(coarse.nodes())] * 2), 8)
    assert fine.points == (113, 113) and lls.shape == (2, 113 * 113)
    post = GridPosterior(fine, lls[1])
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(post.mean() - mu) < 0.05 * sd)
    np.testing.assert_allclose(np.sqrt(np.diag(post.cov())), sd, rtol=0.03)
    assert post.figure_of_merit() == pytest.approx(1 / math.sqrt(np.linalg.det(cov)), rel=0.05)
    # HPD credibility of points drawn from the Gaussian is 1 - exp(-r²/2): the refined grid has it, the coarse one not
    points = np.random.default_rng(0).multivariate_normal(mu, cov, 20)
    want = np.array([1 - math.exp(-float((p - mu) @ inv @ (p - mu)) / 2) for p in points])
    refined = np.array([post.credibility(p) for p in points])
    coarse_cred = np.array([raw.credibility(p) for p in points])
    assert np.abs(refined - want).max() < 0.02
    assert np.abs(coarse_cred - want).max() > 0.2
    with pytest.raises(ValueError, match="refine must be an integer >= 1"):
        refine_loglike(coarse, lls[:, :225], 0)
