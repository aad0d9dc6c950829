"""Whole-model tests of lensflow.flows.Glow: exact log-dets, inverses, densities, state, sampling, precision."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers.fields import lognormal_tensor as _lognormal_maps
from helpers.flow_checks import gen, randomize
from scipy import stats
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lensflow.flows import ActNorm, Glow, Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(glow: Glow, x: torch.Tensor, cond: torch.Tensor | None, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(glow.parameters(), lr=lr)
    for _ in range(steps):
        loss = glow.bits_per_dim(x, cond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- exact log-determinant -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("channels", "cond_dim", "coupling", "split_hidden", "amplitude"),
    [
        (1, 0, "affine", 0, 0),
        (1, 3, "affine", 0, 0),
        (2, 0, "affine", 0, 0),
        (2, 3, "affine", 0, 0),
        (1, 3, "spline", 0, 0),
        (2, 0, "spline", 0, 0),
        (1, 3, "affine", 8, 0),
        (1, 3, "affine", 8, 2),
        (2, 0, "affine", 0, 1),
    ],
)
def test_logdet_matches_brute_force_jacobian(channels, cond_dim, coupling, split_hidden, amplitude):
    padding = "zero" if channels == 1 else "circular"
    pre = Preprocess(channels, log_shift=True)
    glow = Glow(
        channels,
        8,
        2,
        2,
        hidden=8,
        cond_dim=cond_dim,
        padding=padding,
        preprocess=pre,
        init_seed=0,
        coupling=coupling,
        split_hidden=split_hidden,
        amplitude_levels=amplitude,
    )
    glow = glow.double()
    data = _lognormal_maps(18, channels, 8, seed=channels)
    cond = torch.randn(18, cond_dim, generator=gen(7), dtype=torch.float64) if cond_dim else None
    pre.fit(data[:16])
    glow.initialize(data[:16], None if cond is None else cond[:16])
    randomize(glow, 0.2)  # the zero-initialised model would make the test weak
    if coupling == "spline":
        with torch.no_grad():  # O(1) spline parameters: at the random output gains, knot slopes down to e^-13
            for level in glow.flows:  # compound over the layers to singular values below float64's resolution
                for step in level:
                    step.coupling.net.out.logs.fill_(-0.5)
    x = data[16:]
    zs, logdet = glow(x, None if cond is None else cond[16:])

    flow_logdet = (logdet - pre(x)[1]).detach()
    assert float((flow_logdet[0] - flow_logdet[1]).abs()) > 0.5  # data-dependent, i.e. genuinely non-linear
    c = None if cond is None else cond[17:18]

    def encode_flat(v):
        return torch.cat([z.reshape(-1) for z in glow.encode(v.view(1, channels, 8, 8), c)])

    # (vmap is slow on circular padding; the plain loop is fine for 64-128 dimensions)
    jac = torch.autograd.functional.jacobian(encode_flat, x[1].reshape(-1), vectorize=padding == "zero")
    assert jac.shape == (glow.num_dims, glow.num_dims)
    brute = torch.linalg.slogdet(jac)[1]
    assert abs(float(logdet[1].detach() - brute)) < 1e-4, (float(logdet[1]), float(brute))
    # log_prob is the standard-normal density of the whitened latents plus the log-det (scipy reference)
    ref = sum(stats.norm.logpdf(z.detach().numpy()).sum(axis=(1, 2, 3)) for z in zs) + logdet.detach().numpy()
    lp = glow.log_prob(x, None if cond is None else cond[16:]).detach().numpy()
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    if split_hidden or amplitude:  # the split priors' networks and the amplitude layer rebuild from the config
        again = Glow.from_config(glow.config).double()
        again.load_state_dict(glow.state_dict())
        assert again.config["split_hidden"] == split_hidden and again.config["amplitude_levels"] == amplitude
        np.testing.assert_array_equal(again.log_prob(x, None if cond is None else cond[16:]).detach().numpy(), lp)
    if amplitude:  # decode inverts the amplitude layer too
        back = glow.decode([z.detach() for z in zs], None if cond is None else cond[16:])
        torch.testing.assert_close(back, x, rtol=0, atol=1e-10)


# -- exact densities ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_identity_initialised_glow_is_standard_normal(coupling):
    glow = Glow(2, 16, 3, 2, hidden=16, init_seed=0, coupling=coupling)
    for m in glow.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(1)  # keep the identity initialisation (no data-dependent init)
    x = torch.randn(4, 2, 16, 16, generator=gen())
    with torch.no_grad():
        lp = glow.log_prob(x).numpy()
        bpd = glow.bits_per_dim(x).numpy()
    ref = stats.norm.logpdf(x.numpy().astype(np.float64)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lp, ref, rtol=1e-5)
    np.testing.assert_allclose(bpd, -ref / (glow.num_dims * math.log(2)), rtol=1e-5)


def test_shifted_log_preprocessing_gives_lognormal_density():
    # identity flow + fixed shifted-log preprocessing: κ is exactly a shifted lognormal per pixel
    lam, mu, s = 0.02, math.log(0.025), 0.35
    pre = Preprocess(1, log_shift=True, shift=lam)
    with torch.no_grad():
        pre.mean.fill_(mu)
        pre.std.fill_(s)
    glow = Glow(1, 8, 2, 1, hidden=8, preprocess=pre, init_seed=0).double()
    for m in glow.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(1)
    kappa = np.exp(np.random.default_rng(3).normal(mu, s, size=(3, 1, 8, 8))) - lam
    with torch.no_grad():
        lp = glow.log_prob(torch.tensor(kappa)).numpy()
    ref = stats.lognorm.logpdf(kappa, s=s, loc=-lam, scale=math.exp(mu)).sum(axis=(1, 2, 3))
    # (the random orthogonal 1x1 convs were drawn in float32: |log det| ~ 1e-8 each)
    np.testing.assert_allclose(lp, ref, rtol=0, atol=1e-6)


# -- inverses --------------------------------------------------------------------------------------------------
def test_reference_size_round_trip_after_training():
    g = gen(0)
    x = torch.randn(4, 1, 64, 64, generator=g).cumsum(-1).cumsum(-2) * 0.01  # correlated, non-Gaussian scale
    glow = Glow(1, 64, 3, 16, hidden=16, init_seed=0)
    glow.preprocess.fit(x)
    _train(glow, x, None, steps=3, lr=3e-3)
    for level in glow.flows:
        for step in level:  # every coupling has moved away from its zero initialisation
            assert float(step.coupling.net.out.weight.detach().abs().max()) > 2e-3
    glow.eval()
    with torch.no_grad():
        xr = glow.decode(glow.encode(x))
    rel = float((xr - x).abs().max() / x.abs().max())
    assert rel < 1e-5, rel


# -- state -----------------------------------------------------------------------------------------------------
def _cond_model(seed: int) -> tuple[Glow, torch.Tensor, torch.Tensor]:
    pre = Preprocess(2, log_shift=True)
    glow = Glow(2, 16, 2, 2, hidden=16, cond_dim=2, padding="circular", preprocess=pre, init_seed=seed)
    x = _lognormal_maps(8, 2, 16, seed=seed, dtype=torch.float32)
    cond = torch.randn(8, 2, generator=gen(seed))
    pre.fit(x)
    _train(glow, x, cond, steps=3, lr=1e-2)
    return glow, x, cond


def test_state_dict_round_trip_is_bit_identical_and_never_reinitialises():
    a, x, cond = _cond_model(1)
    flags = [v for k, v in a.state_dict().items() if k.endswith("initialized") or k.endswith("fitted")]
    assert len(flags) == 2 * 2 + 1 and all(int(f) == 1 for f in flags)  # 4 ActNorms + Preprocess

    b = Glow.from_config(a.config)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    noise = torch.randn(3, a.num_dims, generator=gen(9))
    with torch.no_grad():
        assert torch.equal(a.log_prob(x, cond), b.log_prob(x, cond))
        assert torch.equal(a.sample(3, cond[:3], noise=noise), b.sample(3, cond[:3], noise=noise))

    before = {k: v.clone() for k, v in b.state_dict().items()}
    b.train()
    b.log_prob(5.0 * x + 0.3, cond)  # a very different batch: must not re-initialise anything
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k

    # a cached inverse from older weights must not survive load_state_dict
    c_model, _, _ = _cond_model(2)
    c = Glow.from_config(a.config)
    c.load_state_dict(c_model.state_dict())
    c.eval()
    with torch.no_grad():
        old = c.sample(3, cond[:3], noise=noise)
        c.load_state_dict(a.state_dict())
        new = c.sample(3, cond[:3], noise=noise)
        assert not torch.equal(old, new)
        assert torch.equal(new, a.sample(3, cond[:3], noise=noise))


def test_config_keys_are_the_keys_of_config():
    """``Glow.config_keys()`` (what callers such as ``bench kl`` pick from a settings mapping) cannot drift from
    ``config``: a key added to one and not the other fails here."""
    glow = Glow(1, 16, 2, 1, 8, preprocess=Preprocess(1, log_shift=True, shift_method="ml", shift_scale=1.5))
    assert tuple(glow.config) == Glow.config_keys()
    from lensflow.bench.kl import build_glow

    student = build_glow(
        1,
        16,
        {
            "levels": 2,
            "steps": 1,
            "hidden": 8,
            "log_shift": True,
            "shift_method": "ml",
            "shift_scale": 1.5,
            "split_hidden": 4,
            "kind": "glow",
        },
        False,
        0,
    )
    assert student.preprocess.shift_scale == 1.5 and student.split_hidden == 4


def test_spline_glow_config_round_trip_and_float32_inverse():
    """A spline Glow rebuilds from its config (bit-identical densities and samples), inverts after training in
    float32, and a config saved before ``coupling`` existed (no such key) is an affine Glow as it was."""
    x = 0.02 * torch.randn(8, 1, 16, 16, generator=gen()).cumsum(-1)
    a = Glow(1, 16, 2, 2, hidden=16, init_seed=0, coupling="spline", spline_bins=5, spline_tail_bound=4.0)
    assert a.config["coupling"] == "spline" and a.config["spline_bins"] == 5 and a.config["spline_tail_bound"] == 4.0
    a.preprocess.fit(x)
    _train(a, x, None, steps=3, lr=1e-2)
    assert float(a.flows[0][0].coupling.net.out.weight.detach().abs().max()) > 2e-3  # moved off the identity
    b = Glow.from_config(a.config)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    noise = torch.randn(3, a.num_dims, generator=gen(9))
    with torch.no_grad():
        assert torch.equal(a.log_prob(x), b.log_prob(x))
        assert torch.equal(a.sample(3, noise=noise), b.sample(3, noise=noise))
        back = a.decode(a.encode(x))
    assert float((back - x).abs().max() / x.abs().max()) < 1e-5

    old = {k: v for k, v in Glow(1, 16, 2, 1, hidden=8).config.items() if not k.startswith(("coupling", "spline"))}
    c, d = Glow.from_config(old, init_seed=3), Glow(1, 16, 2, 1, hidden=8, init_seed=3)
    assert c.config == d.config and c.coupling == "affine"
    for (k, v), (k2, v2) in zip(c.state_dict().items(), d.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_ema_copy_follows_weight_updates():
    glow, x, cond = _cond_model(3)
    ema = AveragedModel(glow, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ema.eval()
    noise = torch.randn(2, glow.num_dims, generator=gen(4))
    with torch.no_grad():
        s0 = ema.module.sample(2, cond[:2], noise=noise)  # fills the inverse caches
    _train(glow, x, cond, steps=2, lr=1e-2)
    ema.update_parameters(glow)
    ref = Glow.from_config(glow.config)
    ref.load_state_dict(ema.module.state_dict())
    ref.eval()
    with torch.no_grad():
        s1 = ema.module.sample(2, cond[:2], noise=noise)
        assert not torch.equal(s0, s1)
        assert torch.equal(s1, ref.sample(2, cond[:2], noise=noise))
    assert torch.equal(copy.deepcopy(glow).log_prob(x, cond), glow.log_prob(x, cond))


# -- sampling --------------------------------------------------------------------------------------------------
def test_sample_noise_order_temperature_and_batch_independence():
    glow = Glow(1, 16, 3, 2, hidden=16, cond_dim=2, init_seed=0)
    x = torch.randn(8, 1, 16, 16, generator=gen())
    cond = torch.randn(8, 2, generator=gen(1))
    glow.initialize(x, cond)
    randomize(glow, 0.05)  # learned priors now have non-trivial means and scales at every level
    glow.eval()
    assert glow.latent_shapes == ((2, 8, 8), (4, 4, 4), (16, 2, 2))
    assert sum(math.prod(s) for s in glow.latent_shapes) == glow.num_dims
    noise = torch.randn(3, glow.num_dims, generator=gen(2))
    parts = glow.split_noise(noise)
    assert torch.equal(parts[0], noise[:, :128].view(3, 2, 8, 8))  # finest split first ...
    assert torch.equal(parts[2], noise[:, 192:].view(3, 16, 2, 2))  # ... top last
    with torch.no_grad():
        s = glow.sample(3, cond[:3], temperature=0.6, noise=noise)
        # temperature scales the whitened latent of every level
        for z, p in zip(glow.encode(s, cond[:3]), parts, strict=True):
            torch.testing.assert_close(z, 0.6 * p, rtol=0, atol=2e-4)
        # map j depends only on noise[j] (and cond[j])
        one = glow.sample(1, cond[1:2], temperature=0.6, noise=noise[1:2])
        torch.testing.assert_close(one[0], s[1], rtol=0, atol=1e-5)
        # cond of shape [cond_dim] broadcasts; generator makes draws reproducible
        a = glow.sample(2, cond[0], generator=gen(5))
        b = glow.sample(2, cond[0], generator=gen(5))
    assert torch.equal(a, b) and a.shape == (2, 1, 16, 16)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            glow.sample(2, cond[:2], temperature=bad)
    with pytest.raises(ValueError, match="cond"):
        glow.sample(2)
    with pytest.raises(ValueError, match="noise"):
        glow.sample(2, cond[:2], noise=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="n must"):
        glow.sample(0, cond[:1])


# -- bad arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 12, "levels": 3}, "image_size"),
        ({"levels": 0}, "levels"),
        ({"steps": 0}, "steps"),
        ({"hidden": 0}, "hidden"),
        ({"in_channels": 0}, "in_channels"),
        ({"cond_dim": -1}, "cond_dim"),
        ({"padding": "reflect"}, "padding"),
        ({"preprocess": Preprocess(3)}, "preprocess"),
        ({"scale_bound": 0.0}, "scale_bound"),
        ({"coupling": "x"}, "^coupling must be 'affine' or 'spline', got 'x'$"),
        ({"coupling": None}, "coupling"),
        ({"spline_bins": 1}, "spline_bins"),
        ({"spline_bins": 4096}, "spline_bins"),
        ({"spline_tail_bound": 0.0}, "spline_tail_bound"),
        ({"prior_bound": -1.0}, "prior_bound"),
        ({"split_hidden": -1}, "split_hidden"),
        ({"amplitude_levels": -1}, "amplitude_levels"),
        ({"amplitude_levels": 3}, "^amplitude_levels must be at most levels = 2, got 3$"),
        ({"levels": 2.0}, "levels"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    args = {"in_channels": 1, "image_size": 16, "levels": 2, "steps": 1, "hidden": 8} | kwargs
    with pytest.raises(ValueError, match=name):
        Glow(**args)


def test_forward_rejects_bad_inputs():
    glow = Glow(1, 16, 2, 1, hidden=8)
    with pytest.raises(ValueError, match="x must"):
        glow.log_prob(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="x must"):
        glow.log_prob(torch.zeros(2, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="cond"):
        glow.log_prob(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="zs"):
        glow.decode([torch.zeros(2, 2, 8, 8)])


# -- numerics ----------------------------------------------------------------------------------------------------
def test_ten_sigma_inputs_stay_finite():
    glow = Glow(1, 16, 2, 3, hidden=16, init_seed=0)
    x = 0.02 * torch.randn(16, 1, 16, 16, generator=gen())
    glow.preprocess.fit(x)
    _train(glow, x, None, steps=5, lr=1e-2)
    sign = torch.where(torch.rand(4, 1, 16, 16, generator=gen(1)) > 0.5, 1.0, -1.0)
    extreme = torch.cat([10 * 0.02 * sign, torch.full((1, 1, 16, 16), -10 * 0.02), 10 * x[:3]])
    lp = glow.log_prob(extreme)
    assert torch.isfinite(lp).all()
    lp.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in glow.parameters() if p.grad is not None)
    with torch.no_grad():
        back = glow.decode(glow.encode(extreme))
        assert torch.isfinite(back).all()
        torch.testing.assert_close(back, extreme, rtol=0, atol=1e-5)
        assert torch.isfinite(glow.sample(4, temperature=1.0, generator=gen(2))).all()


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_bf16_autocast_keeps_logdets_float32(coupling):
    glow = Glow(1, 16, 2, 2, hidden=32, cond_dim=2, init_seed=0, coupling=coupling)
    x = torch.randn(8, 1, 16, 16, generator=gen())
    cond = torch.randn(8, 2, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        glow.initialize(x, cond)  # statistics computed in float64 even here
    randomize(glow, 0.02)
    lp32 = glow.log_prob(x, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs, logdet = glow(x, cond)
        lp = glow.log_prob(x, cond)
    assert logdet.dtype == torch.float32 and lp.dtype == torch.float32
    assert all(z.dtype == torch.float32 for z in zs)
    assert torch.isfinite(logdet).all() and torch.isfinite(lp).all()
    # bf16 networks perturb the density only slightly (per dimension, in nats)
    assert float((lp - lp32).detach().abs().max()) / glow.num_dims < 0.02
    lp.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in glow.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s = glow.sample(3, cond[:3], generator=gen(3))
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
