"""CropGaussian: the fitted exact Gaussian of a stationary field on a crop, against brute force and the simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.flow_checks import check_flow_layer
from torch import Tensor

from lensflow.flows import Glow, Preprocess
from lensflow.flows.crop_gaussian import CropGaussian, crop_correlation
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lagged_products_equal_a_brute_force_double_loop():
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sums, pairs = crop_correlation(x)
    n = 5
    for du in range(-(n - 1), n):
        for dv in range(-(n - 1), n):
            want = np.zeros((2, 2))
            count = 0
            for i in range(n):
                for k in range(n):
                    j, m = i + du, k + dv
                    if 0 <= j < n and 0 <= m < n:
                        count += 1
                        want += np.einsum("ba,bc->ac", x[:, :, i, k].numpy(), x[:, :, j, m].numpy())
            assert int(pairs[du + n - 1, dv + n - 1]) == count
            np.testing.assert_allclose(sums[:, :, du + n - 1, dv + n - 1].numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [1, 2])
def test_the_fitted_covariance_is_the_simulators_and_log_p_is_exact(channels):
    # an independent reference: FlatSimulator's exact crop covariance and log-density (sims/exact.py)
    sim = FlatSimulator(8, 4.0, dict(PLANCK18), [0.8, 1.5][:channels], kind="gaussian", periodic=False)
    train = torch.from_numpy(sim.generate(20000, seed=[1, 0]).astype(np.float64))
    layer = CropGaussian(channels, 8)
    layer.initialize(train)
    exact = torch.from_numpy(sim.likelihood.covariance())
    cov = layer.covariance()
    scale = float(exact.diagonal().mean())
    assert float((cov - exact).abs().max()) < 0.03 * scale  # 20,000 maps: ξ to ~1 %
    test = sim.generate(2000, seed=[2, 0]).astype(np.float64)
    z, logdet = layer(torch.from_numpy(test))
    d = z[0].numel()
    model = logdet - 0.5 * (z**2).sum((1, 2, 3)) - 0.5 * d * math.log(2 * math.pi)
    gap = (sim.log_prob(test) - model.numpy()) / d  # nats per pixel
    assert abs(gap.mean()) < 2e-3  # a perfect model up to ξ's estimation noise
    assert gap.std() < 0.02


def test_inverse_and_log_det_against_the_brute_force_jacobian():
    w = torch.randn(4000, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # an isotropic, stationary field (periodic smoothing, then the channels mixed): what the layer assumes
    x = w + 0.3 * sum(w.roll(s, dims=d) for s in (1, -1) for d in (-1, -2))
    x = torch.stack([x[:, 0], 0.6 * x[:, 0] + 0.8 * x[:, 1]], dim=1)
    layer = CropGaussian(2, 4)
    layer.initialize(x)
    y, logdet = layer(x[:2])
    torch.testing.assert_close(layer.inverse(y), x[:2], rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 2, 4, 4))[0].reshape(-1), x[0].reshape(-1))
    assert float(logdet[0]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-9)
    # whitened: the fitted maps have identity covariance
    flat = layer(x)[0].reshape(4000, -1)
    torch.testing.assert_close(flat.T @ flat / 4000, torch.eye(32, dtype=torch.float64), rtol=0, atol=0.1)


def test_only_the_correlation_is_saved_and_a_reload_rebuilds_the_same_transform():
    x = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer = CropGaussian(1, 6)
    layer.initialize(x)
    state = layer.state_dict()
    assert set(state) == {"xi", "initialized"} and state["xi"].shape == (1, 1, 11, 11)
    again = CropGaussian(1, 6)
    again.load_state_dict(state)
    assert again.is_initialized
    torch.testing.assert_close(again(x)[0], layer(x)[0], rtol=0, atol=0)
    assert again(x.float())[0].dtype == torch.float32


def test_bad_sizes_and_conditioning_are_one_clear_line():
    with pytest.raises(ValueError, match="exceeds max_dims"):
        CropGaussian(3, 64)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 6, 6\]"):
        CropGaussian(1, 6)(torch.zeros(2, 1, 5, 5))


def test_a_glow_behind_it_round_trips_and_its_config_rebuilds_it():
    sim = FlatSimulator(16, 3.28, dict(PLANCK18), 1.0, kind="lognormal", periodic=False)
    maps = torch.from_numpy(sim.generate(512, seed=[5, 0]))
    glow = Glow(
        1,
        16,
        2,
        2,
        16,
        preprocess=Preprocess(1, log_shift=True, shift_method="ml"),
        stationary=True,
        stationary_dense=True,
        init_seed=0,
    )
    glow.fit_preprocessing(maps)
    glow.initialize(maps[:128])
    assert isinstance(glow.stationary, CropGaussian)
    with torch.no_grad():
        lp = glow.log_prob(maps[:4])
        assert torch.isfinite(lp).all()
        twin = Glow.from_config(glow.config)
        twin.load_state_dict(glow.state_dict())
        torch.testing.assert_close(twin.log_prob(maps[:4]), lp)
        x = glow.sample(4, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all() and x.shape == (4, 1, 16, 16)


def test_the_factor_is_built_once_and_rebuilt_only_for_a_new_correlation():
    x = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    layer = CropGaussian(1, 6)
    layer.initialize(x)
    layer(x)
    first = layer._cholesky()
    layer.to("cpu").eval()  # samplers move modules between calls: no rebuild (seconds at 64²)
    layer.inverse(x)
    assert layer._cholesky() is first
    other = CropGaussian(1, 6)
    other.initialize(2 * x)
    layer.load_state_dict(other.state_dict())  # a new ξ: a new factor, the new transform
    torch.testing.assert_close(layer(x)[0], other(x)[0], rtol=0, atol=0)
    assert layer._cholesky() is not first


def _grid_maps(kind: str, npix: int, n: int, om: list[float], s8: list[float], seed: int):
    maps, theta = [], []
    for i, o in enumerate(om):
        for j, s in enumerate(s8):
            sim = FlatSimulator(npix, 4.0, {**PLANCK18, "Omega_m": o, "sigma_8": s}, 1.0, kind=kind)
            maps.append(sim.generate(n, seed=[seed, i, j]).astype(np.float64))
            theta.append(np.tile([o, s], (n, 1)))
    return torch.from_numpy(np.concatenate(maps)), torch.from_numpy(np.concatenate(theta))


def test_a_conditional_fit_is_the_simulators_covariance_between_the_nodes():
    # an independent reference at a θ that is not a training node: the simulator's exact covariance and log p
    om, s8 = [0.22, 0.28, 0.34, 0.40], [0.70, 0.76, 0.82, 0.88]
    x, theta = _grid_maps("gaussian", 8, 1500, om, s8, seed=7)
    mean, std = theta.mean(0), theta.std(0)
    layer = CropGaussian(1, 8, cond_dim=2, degree=2)
    layer.initialize(x, (theta - mean) / std)
    assert layer.xi.shape == (9, 1, 1, 15, 15)
    for held in ([0.31, 0.79], [0.25, 0.86]):
        sim = FlatSimulator(8, 4.0, {**PLANCK18, "Omega_m": held[0], "sigma_8": held[1]}, 1.0, kind="gaussian")
        c = (torch.tensor(held, dtype=torch.float64) - mean) / std
        exact = torch.from_numpy(sim.likelihood.covariance())
        scale = float(exact.diagonal().mean())
        assert float((layer.covariance(c) - exact).abs().max()) < 0.03 * scale
        test = sim.generate(1000, seed=[8, 0]).astype(np.float64)
        z, logdet = layer(torch.from_numpy(test), c.expand(1000, 2))
        d = z[0].numel()
        model = logdet - 0.5 * (z**2).sum((1, 2, 3)) - 0.5 * d * math.log(2 * math.pi)
        assert abs(((sim.log_prob(test) - model.numpy()) / d).mean()) < 2e-3
    # the covariance grows with σ_8 and the transform inverts per condition in one mixed batch
    lo, hi = (torch.tensor([0.3, s], dtype=torch.float64) for s in (0.72, 0.88))
    assert float(layer.covariance((hi - mean) / std).trace()) > 1.3 * float(layer.covariance((lo - mean) / std).trace())
    cond = ((theta[::1500] - mean) / std)[:4].repeat_interleave(2, 0)
    y, _ = layer(x[:8], cond)
    torch.testing.assert_close(layer.inverse(y, cond), x[:8], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs at least 9 distinct conditions"):
        CropGaussian(1, 8, cond_dim=2, degree=2).initialize(x[:100], ((theta - mean) / std)[:100])
    with pytest.raises(ValueError, match="cond: CropGaussian was built with cond_dim=2"):
        layer(x[:2])


def test_a_conditional_glow_behind_it_reloads_and_its_ema_shares_the_factors():
    from lensflow.flows import crop_gaussian

    x, theta = _grid_maps("lognormal", 16, 64, [0.25, 0.35], [0.75, 0.85], seed=9)
    x = x.float()
    cond = ((theta - theta.mean(0)) / theta.std(0)).float()
    glow = Glow(1, 16, 2, 1, 8, cond_dim=2, stationary=True, stationary_dense=True, stationary_degree=1, init_seed=0)
    glow.fit_preprocessing(x, cond)
    glow.initialize(x[::2], cond[::2])
    crop_gaussian._FACTORS.clear()
    with torch.no_grad():
        lp = glow.log_prob(x[:130:8], cond[:130:8])
        assert len(crop_gaussian._FACTORS) == 3  # one factor per distinct θ of the batch
        twin = Glow.from_config(glow.config)
        twin.load_state_dict(glow.state_dict())
        torch.testing.assert_close(twin.log_prob(x[:130:8], cond[:130:8]), lp)
        assert len(crop_gaussian._FACTORS) == 3  # equal ξ: the same factors
        s = glow.sample(4, cond=cond[:1].expand(4, 2), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(s).all()
    with pytest.raises(ValueError, match="conditional crop Gaussian is fitted on maps and their conditions"):
        Glow(1, 16, 2, 1, 8, cond_dim=2, stationary=True, stationary_dense=True).fit_preprocessing(x)


def _gaussian_part(pre: Preprocess, layer: CropGaussian, x: Tensor, cond: Tensor) -> Tensor:
    h, ld = pre(x, cond)
    z, ld2 = layer(h, cond)
    return ld + ld2 - 0.5 * (z**2).sum((1, 2, 3)) - 0.5 * z[0].numel() * math.log(2 * math.pi)


def test_a_conditional_shifted_log_makes_the_gaussian_part_exact_between_the_nodes():
    # A lognormal field's log has a θ-dependent mean (log λ − σ²(θ)/2) and variance; after a θ-dependent shifted
    # log the crop Gaussian is the exact model at any θ. References: the simulator's λ, brute-force moments of
    # the log's exact mean and std and the exact log p, at a θ that is not a node.
    om, s8 = [0.22, 0.30, 0.38], [0.70, 0.80, 0.90]
    x, theta = _grid_maps("lognormal", 8, 800, om, s8, seed=11)
    mean, std = theta.mean(0), theta.std(0)
    cond = (theta - mean) / std
    held = [0.27, 0.86]
    sim = FlatSimulator(8, 4.0, {**PLANCK18, "Omega_m": held[0], "sigma_8": held[1]}, 1.0, kind="lognormal")
    test = torch.from_numpy(sim.generate(1000, seed=[12, 0]).astype(np.float64))
    c = ((torch.tensor(held, dtype=torch.float64) - mean) / std).expand(len(test), 2)
    gaps = {}
    for degree in (2, None):
        pre = Preprocess(1, log_shift=True, shift_method="ml", cond_dim=2, cond_degree=degree)
        pre.fit(x, cond)
        layer = CropGaussian(1, 8, cond_dim=2, degree=2)
        layer.initialize(pre(x, cond)[0], cond)
        with torch.no_grad():
            model = _gaussian_part(pre, layer, test, c)
        gaps[degree] = float(((sim.log_prob(test.numpy()) - model.numpy()) / 64).mean())
        if degree is not None:
            shift, mu, sd = (t[0, 0].item() for t in pre.statistics(c[:1]))
            assert shift == pytest.approx(float(sim.shift[0]), rel=0.01)
            # κ = λ (exp(g − σ²/2) − 1), g ~ N(0, σ²): log(κ + λ) has mean log λ − σ²/2 and std σ
            var = float(sim.likelihood.sigma2[0])
            # the fit's noise: a crop's mean scatters with the modes larger than it, over 800 maps a node
            se = float(torch.log(test + float(sim.shift[0])).mean((1, 2, 3)).std()) / math.sqrt(800)
            assert mu == pytest.approx(math.log(float(sim.shift[0])) - var / 2, abs=4 * se)
            assert sd == pytest.approx(math.sqrt(var), rel=0.03)  # ~2 standard errors of a variance over 800 maps
            check_flow_layer(pre, test[:3], c[:3], inverse_atol=1e-12, logdet_atol=1e-9)
    assert abs(gaps[2]) < 1e-3  # nats per pixel: exact up to the estimate's noise
    assert gaps[None] > 3 * max(abs(gaps[2]), 2e-4)  # one pooled mean and std are not the field's at this θ


def test_a_conditional_shifted_log_refuses_what_it_cannot_fit_in_one_line():
    x, theta = _grid_maps("lognormal", 8, 20, [0.25, 0.35], [0.75, 0.85], seed=13)
    cond = (theta - theta.mean(0)) / theta.std(0)
    with pytest.raises(ValueError, match="need at least 9 distinct conditions, the maps have 4"):
        Preprocess(1, log_shift=True, cond_dim=2, cond_degree=2).fit(x, cond)
    with pytest.raises(ValueError, match="cond: a conditional Preprocess is fitted on maps and their"):
        Preprocess(1, log_shift=True, cond_dim=2, cond_degree=1).fit(x)
    pre = Preprocess(1, log_shift=True, cond_dim=2, cond_degree=1)
    pre.fit(x, cond)
    with pytest.raises(ValueError, match=r"cond: this Preprocess needs cond of shape \[3, 2\], got None"):
        pre(x[:3])
    glow = Glow.from_config({**Glow(1, 8, 1, 1, 4, cond_dim=2).config, "log_shift": True, "shift_degree": 1})
    glow.fit_preprocessing(x.float(), cond.float())
    twin = Glow.from_config(glow.config)
    twin.load_state_dict(glow.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            twin.log_prob(x[:5].float(), cond[:5].float()), glow.log_prob(x[:5].float(), cond[:5].float())
        )
    with pytest.raises(ValueError, match="cond: a conditional preprocessing is fitted on maps and their conditions"):
        glow.fit_preprocessing(x.float())
    with pytest.raises(ValueError, match="preprocess has cond_dim=2 but cond_dim=1"):
        Glow(1, 8, 1, 1, 4, cond_dim=1, preprocess=pre)
