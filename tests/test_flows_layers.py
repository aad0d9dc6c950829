"""Per-layer tests of lensflow.flows: exact inverses, log-dets against brute force, caches, bounds."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers.flow_checks import check_forward_inverse, check_logdet, gen, randomize
from scipy import stats

from lensflow.flows import (
    ActNorm,
    AffineCoupling,
    CouplingNet,
    FlowStep,
    InvConv1x1,
    Preprocess,
    SplineCoupling,
    Split,
    Squeeze,
    _conv,
    _fused_cpu,
)
from lensflow.flows.spline import rq_spline
from lensflow.flows.split import TopPrior

pytestmark = pytest.mark.usefixtures("one_thread")


# -- ActNorm --------------------------------------------------------------------------------------------------
def test_actnorm_data_init_standardises_and_is_persistent():
    x = 3.0 + 0.5 * torch.randn(16, 4, 8, 8, generator=gen(), dtype=torch.float64)
    x[:, 1] *= 7.0
    an = ActNorm(4).double()
    assert not an.is_initialized
    with torch.no_grad():
        y, _ = an(x)
    assert an.is_initialized and int(an.initialized) == 1
    np.testing.assert_allclose(y.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(y.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, rtol=1e-5)
    before = {k: v.clone() for k, v in an.state_dict().items()}
    an(100.0 * x + 5.0)  # a second, very different batch must not re-initialise
    for k, v in an.state_dict().items():
        assert torch.equal(v, before[k]), k
    fresh = ActNorm(4).double()
    fresh.load_state_dict(an.state_dict())
    fresh(100.0 * x + 5.0)
    assert torch.equal(fresh.bias, an.bias) and torch.equal(fresh.logs, an.logs)


def test_actnorm_round_trip_and_logdet():
    x = torch.randn(3, 3, 4, 4, generator=gen(), dtype=torch.float64)
    an = ActNorm(3).double()
    an.initialize(2.0 * x + 1.0)
    _, ld = check_forward_inverse(an, x, atol=1e-12)
    check_logdet(an, x, None, ld, atol=1e-9)
    assert ld.shape == (3,)


def test_actnorm_bad_input():
    with pytest.raises(ValueError, match="channels"):
        ActNorm(0)
    with pytest.raises(ValueError, match="x must have shape"):
        ActNorm(3).initialize(torch.zeros(2, 4, 3, 3))


# -- InvConv1x1 -----------------------------------------------------------------------------------------------
def test_invconv_starts_orthogonal_with_lu_structure():
    torch.manual_seed(0)
    ic = InvConv1x1(6).double()
    w = ic.weight()
    # factors are stored in float32 (default dtype) at construction
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6)
    assert abs(float(ic.log_s.detach().sum())) < 1e-6
    p = ic.perm
    assert torch.equal(p @ p.T, torch.eye(6, dtype=torch.float64))  # a permutation matrix
    assert torch.all((p == 0) | (p == 1))


def test_invconv_round_trip_logdet_and_inverse_accuracy():
    torch.manual_seed(0)
    ic = InvConv1x1(4).double()
    randomize(ic, 0.5)
    x = torch.randn(2, 4, 3, 3, generator=gen(), dtype=torch.float64)
    _, ld = check_forward_inverse(ic, x, atol=1e-12)
    w = ic.weight()
    # independent references: slogdet of the assembled matrix, and the brute-force Jacobian
    assert abs(float(torch.linalg.slogdet(w.detach())[1]) * 9 - float(ld[0].detach())) < 1e-10
    check_logdet(ic, x, None, ld, atol=1e-9)
    torch.testing.assert_close(ic.inverse_weight(), torch.linalg.inv(w), rtol=0, atol=1e-12)


def test_invconv_eval_cache_is_invalidated_by_weight_updates():
    torch.manual_seed(0)
    ic = InvConv1x1(4)
    ic.eval()
    with torch.no_grad():
        w1 = ic.inverse_weight()
        assert ic.inverse_weight() is w1  # cached in eval mode without autograd
        ic.log_s.add_(0.3)  # e.g. an optimiser or EMA step
        w2 = ic.inverse_weight()
    assert w2 is not w1
    torch.testing.assert_close(w2, torch.linalg.inv(ic.weight().double()).float(), rtol=1e-6, atol=1e-6)
    # no caching while training or when gradients are needed
    ic.train()
    assert ic._cache is None
    with torch.no_grad():
        assert ic.inverse_weight() is not ic.inverse_weight()
    # deepcopy (EMA copies) does not carry the cache
    ic.eval()
    with torch.no_grad():
        ic.inverse_weight()
    assert ic._cache is not None
    assert copy.deepcopy(ic)._cache is None
    # load_state_dict bumps the version counters
    other = InvConv1x1(4)
    with torch.no_grad():
        ic.load_state_dict(other.state_dict())
        torch.testing.assert_close(ic.inverse_weight(), other.inverse_weight(), rtol=0, atol=0)


# -- AffineCoupling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cond_dim", [0, 3])
@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_coupling_identity_init_round_trip_and_logdet(cond_dim, padding):
    torch.manual_seed(0)
    cp = AffineCoupling(5, hidden=8, cond_dim=cond_dim, padding=padding).double()
    x = torch.randn(2, 5, 4, 4, generator=gen(), dtype=torch.float64)
    cond = torch.randn(2, cond_dim, generator=gen(2), dtype=torch.float64) if cond_dim else None
    y, ld = cp(x, cond)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(2, dtype=torch.float64))  # zero-init last conv
    randomize(cp, 0.3)
    (y,), ld = check_forward_inverse(cp, x, cond, atol=1e-12)
    assert float((y - x).detach().abs().max()) > 0.1 and float(ld.detach().abs().min()) > 0.1  # non-trivial
    check_logdet(cp, x, cond, ld, atol=1e-9)


def test_coupling_scale_is_bounded():
    torch.manual_seed(0)
    cp = AffineCoupling(4, hidden=8, scale_bound=1.5)
    x = 10.0 * torch.randn(8, 4, 4, 4, generator=gen())
    cp(x)  # data-dependent init of the hidden ActNorms
    randomize(cp, 0.5)
    with torch.no_grad():
        cp.net.out.logs.fill_(3.0)  # output gain e^9: raw log-scales in the thousands
        _, log_s = cp._shift_logscale(x[:, :2], None)
    assert float(log_s.abs().max()) > 0.99 * 1.5  # saturated ...
    assert float(log_s.abs().max()) <= 1.5  # ... but bounded
    y, ld = cp(x)
    assert torch.isfinite(y).all() and float(ld.detach().abs().max()) <= 1.5 * 2 * 16
    assert torch.isfinite(cp.inverse(y)).all()


def test_coupling_cond_is_required_and_checked():
    cp = AffineCoupling(4, hidden=8, cond_dim=2)
    with pytest.raises(ValueError, match="cond"):
        cp(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="cond"):
        cp(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="channels"):
        AffineCoupling(1, hidden=8)
    with pytest.raises(ValueError, match="scale_bound"):
        AffineCoupling(4, hidden=8, scale_bound=0.0)


# -- SplineCoupling -------------------------------------------------------------------------------------------
def _random_spline(cond_dim: int, padding: str = "zero") -> SplineCoupling:
    """A float64 spline coupling away from its identity initialisation, with O(1) raw parameters (output gain 1):
    random weights with the default gain give knot slopes down to ~1e-6, where any inverse loses ~1e6 ulps."""
    torch.manual_seed(0)
    cp = SplineCoupling(5, hidden=8, cond_dim=cond_dim, padding=padding, bins=6, tail_bound=3.0).double()
    randomize(cp, 0.3)
    with torch.no_grad():
        cp.net.out.logs.zero_()
    return cp


@pytest.mark.parametrize("cond_dim", [0, 3])
@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_spline_identity_init_round_trip_and_logdet(cond_dim, padding):
    torch.manual_seed(0)
    x = 1.5 * torch.randn(2, 5, 4, 4, generator=gen(), dtype=torch.float64)
    cond = torch.randn(2, cond_dim, generator=gen(2), dtype=torch.float64) if cond_dim else None
    cp = SplineCoupling(5, hidden=8, cond_dim=cond_dim, padding=padding, bins=6, tail_bound=3.0).double()
    y, ld = cp(x, cond)  # zero-initialised last conv: equal bins, unit slopes and knot derivatives
    torch.testing.assert_close(y, x, rtol=0, atol=1e-15)
    torch.testing.assert_close(ld, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-14)
    cp = _random_spline(cond_dim, padding)
    (y,), ld = check_forward_inverse(cp, x, cond, atol=1e-10)  # slopes down to ~1e-5 here (see _random_spline)
    assert float((y - x).detach().abs().max()) > 0.5 and float(ld.detach().abs().min()) > 5.0  # non-trivial
    check_logdet(cp, x, cond, ld, atol=1e-9)


def test_spline_identity_init_float32():
    cp = SplineCoupling(8, hidden=16)
    x = 2.0 * torch.randn(4, 8, 6, 6, generator=gen())
    with torch.no_grad():
        y, ld = cp(x)
    assert ld.dtype == torch.float32
    torch.testing.assert_close(y, x, rtol=0, atol=4e-7)
    assert float(ld.abs().max()) < 1e-5  # 144 pixels x a few ulps
    with torch.no_grad():
        torch.testing.assert_close(cp.inverse(x), x, rtol=0, atol=4e-7)


def test_spline_tails_are_the_identity():
    """Beyond ±tail_bound the layer passes values through unchanged (slope 1, log-det 0), random weights or not; at
    the bound the spline meets the tails continuously, with unit slope."""
    cp = _random_spline(0)
    bound = cp.tail_bound
    x = torch.randn(3, 5, 4, 4, generator=gen(), dtype=torch.float64)
    sign = torch.where(x[:, 3:] >= 0, 1.0, -1.0)
    x[:, 3:] = sign * (bound + 1e-9 + 4.0 * x[:, 3:].abs())  # every changed value outside [-bound, bound]
    y, ld = cp(x)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(cp.inverse(x), x)
    # element-wise: mixed inside/outside values, log-det 0 exactly outside and not inside
    theta = torch.randn(7, 3 * 6 - 1, generator=gen(3), dtype=torch.float64)
    v = torch.tensor([-100.0, -bound - 1e-12, -bound, -1.0, 0.5, bound, 2 * bound], dtype=torch.float64)
    out, lad = rq_spline(v, theta, bound)
    outside = v.abs() > bound
    assert torch.equal(out[outside], v[outside]) and torch.equal(lad[outside], torch.zeros(3, dtype=torch.float64))
    assert float(lad[3:5].abs().min()) > 1e-3  # the random spline is not the identity inside
    torch.testing.assert_close(out[[1, 2, 5]], v[[1, 2, 5]], rtol=0, atol=1e-12)  # continuous at ±bound
    torch.testing.assert_close(lad[[2, 5]], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)  # unit slope


def test_spline_is_monotonic_and_bounded_at_extreme_parameters():
    """Raw parameters in the thousands (a diverging network) still give a finite, increasing, invertible spline."""
    theta = 1e3 * torch.randn(1, 3 * 8 - 1, generator=gen(), dtype=torch.float64).expand(2001, -1)
    v = torch.linspace(-5.0, 5.0, 2001, dtype=torch.float64)
    out, lad = rq_spline(v, theta, 5.0)
    assert torch.isfinite(out).all() and torch.isfinite(lad).all()
    assert bool((out[1:] >= out[:-1]).all()) and float(out.abs().max()) <= 5.0
    back, nlad = rq_spline(out, theta, 5.0, inverse=True)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(rq_spline(back, theta, 5.0)[0], out, rtol=0, atol=1e-12)  # y -> x -> y
    torch.testing.assert_close(nlad, -lad, rtol=0, atol=1e-6)


def test_spline_gradients_and_bf16_autocast():
    cp = SplineCoupling(4, hidden=16, cond_dim=2)
    randomize(cp, 0.1)
    x = torch.randn(4, 4, 8, 8, generator=gen())
    x[0, 2:, 0, 0] = 50.0  # a tail value: a zero-gradient branch must not give NaN gradients
    cond = torch.randn(4, 2, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ld = cp(x, cond)
    assert y.dtype == torch.float32 and ld.dtype == torch.float32
    (y.square().sum() + ld.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in cp.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(cp.inverse(y, cond), x, rtol=0, atol=1e-4)


def test_spline_bad_arguments():
    cp = SplineCoupling(4, hidden=8, cond_dim=2)
    with pytest.raises(ValueError, match="cond"):
        cp(torch.zeros(1, 4, 4, 4))
    for kwargs, name in (
        ({"channels": 1}, "channels"),
        ({"bins": 1}, "bins"),
        ({"bins": 1000}, "bins"),
        ({"tail_bound": 0.0}, "tail_bound"),
        ({"tail_bound": float("inf")}, "tail_bound"),
    ):
        with pytest.raises(ValueError, match=name):
            SplineCoupling(**({"channels": 4, "hidden": 8} | kwargs))


# -- CouplingNet: fused CPU training path against plain autograd ------------------------------------------------
def _net_grads(net, x, cond, gy):
    inputs = [x] + ([cond] if cond is not None else []) + list(net.parameters())
    y = net(x, cond)
    return y, torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cond_dim", [0, 3])
@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_coupling_net_fused_backward_matches_autograd(padding, cond_dim, dtype, monkeypatch):
    """The hand-written GEMM backward (workspace, in-place ReLU masks, 9-tap 3x3 convolutions) gives
    autograd's gradients for the input, cond and every parameter, on a non-square map with odd sizes."""
    monkeypatch.setattr(_fused_cpu, "FUSED_MIN_MACS", 0)  # fused even for this tiny net
    torch.manual_seed(0)
    net = CouplingNet(3, 4, 16, cond_dim=cond_dim, padding=padding).to(dtype)
    randomize(net, 0.3)
    x = torch.randn(2, 3, 5, 7, generator=gen(), dtype=dtype, requires_grad=True)
    cond = torch.randn(2, cond_dim, generator=gen(2), dtype=dtype, requires_grad=True) if cond_dim else None
    gy = torch.randn(2, 4, 5, 7, generator=gen(3), dtype=dtype)
    y1, g1 = _net_grads(net, x, cond, gy)
    assert type(y1.grad_fn).__name__ == "_CouplingNetFnBackward"
    monkeypatch.setattr(_fused_cpu, "use_fused", lambda *a: False)
    y0, g0 = _net_grads(net, x, cond, gy)
    assert type(y0.grad_fn).__name__ != "_CouplingNetFnBackward"
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_coupling_net_fused_gradcheck(padding):
    """Finite differences (an independent reference) check the fused backward, FiLM included."""
    torch.manual_seed(0)
    net = CouplingNet(2, 2, 6, cond_dim=2, padding=padding).double()
    randomize(net, 0.5)
    x = torch.randn(2, 2, 3, 4, generator=gen(), dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 2, generator=gen(2), dtype=torch.float64, requires_grad=True)
    g = (net.out.logs * net.out.logscale_factor).exp()
    w3 = (net.out.weight * g.view(-1, 1, 1, 1)).detach().requires_grad_()
    b3 = (net.out.bias * g).detach().requires_grad_()
    w1, b1, w2, b2 = (t.detach().requires_grad_() for t in (net.weight1, net.bias1, net.weight2, net.bias2))

    def f(x, w1, b1, w2, b2, w3, b3, cond):
        gamma, beta = net.film(cond).chunk(2, dim=1)
        return _fused_cpu._CouplingNetFn.apply(
            x.contiguous(memory_format=torch.channels_last), w1, b1, w2, b2, w3, b3, gamma, beta, padding
        )

    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2, w3, b3, cond), eps=1e-6, atol=1e-7)


def test_coupling_net_fused_under_vmap(monkeypatch):
    """jacobian(vectorize=True) vmaps the backward: the fused Function then falls back to plain ops (out= ops have
    no batching rule) and gives the same Jacobian as the non-vectorized loop and as the unfused network."""
    monkeypatch.setattr(_fused_cpu, "FUSED_MIN_MACS", 0)
    torch.manual_seed(0)
    net = CouplingNet(2, 2, 6, cond_dim=2, padding="circular").double()
    randomize(net, 0.5)
    x = torch.randn(1, 2, 3, 4, generator=gen(), dtype=torch.float64)
    cond = torch.randn(1, 2, generator=gen(2), dtype=torch.float64)

    def f(v):
        return net(v.view_as(x), cond).reshape(-1)

    jv = torch.autograd.functional.jacobian(f, x.reshape(-1), vectorize=True)
    jl = torch.autograd.functional.jacobian(f, x.reshape(-1))
    monkeypatch.setattr(_fused_cpu, "use_fused", lambda *a: False)
    jp = torch.autograd.functional.jacobian(f, x.reshape(-1))
    assert float(jp.abs().max()) > 0.1
    torch.testing.assert_close(jv, jp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jl, jp, rtol=1e-12, atol=1e-12)


def test_coupling_net_paths_agree_and_workspace_is_reused(monkeypatch):
    """no_grad (oneDNN conv + fused ReLU) and grad (custom Function) give the same output; consecutive
    backward passes of different sizes share one per-thread workspace without corrupting each other."""
    monkeypatch.setattr(_fused_cpu, "FUSED_MIN_MACS", 0)
    torch.manual_seed(0)
    big, small = CouplingNet(2, 4, 32), CouplingNet(4, 8, 32)
    randomize(big, 0.3)
    randomize(small, 0.3)
    xb = torch.randn(4, 2, 16, 16, generator=gen())
    xs = torch.randn(4, 4, 8, 8, generator=gen(1))
    with torch.no_grad():
        yb = big(xb)
    torch.testing.assert_close(big(xb), yb, rtol=1e-5, atol=1e-6)
    big, small, xb, xs = big.double(), small.double(), xb.double(), xs.double()
    loss = big(xb).square().sum() + small(xs).square().sum()
    loss.backward()
    g_fused = [p.grad.clone() for p in (*big.parameters(), *small.parameters())]
    for p in (*big.parameters(), *small.parameters()):
        p.grad = None
    monkeypatch.setattr(_fused_cpu, "use_fused", lambda *a: False)
    (big(xb).square().sum() + small(xs).square().sum()).backward()
    for a, p in zip(g_fused, (*big.parameters(), *small.parameters()), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-11, atol=1e-11)


def test_circular_pad_keeps_channels_last():
    x = torch.randn(2, 3, 5, 6, generator=gen()).contiguous(memory_format=torch.channels_last)
    p = _conv.circular_pad(x, 1)
    assert p.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p, torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), rtol=0, atol=0)


# -- Squeeze, Split, TopPrior, FlowStep --------------------------------------------------------------------------
def test_squeeze_layout_and_round_trip():
    x = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).view(2, 2, 4, 6)
    y, ld = Squeeze()(x)
    assert y.shape == (2, 8, 2, 3) and torch.equal(ld, torch.zeros(2))
    # documented layout: out channel 4c + 2dy + dx = in channel c at block offset (dy, dx)
    for c in range(2):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(y[:, 4 * c + 2 * dy + dx], x[:, c, dy::2, dx::2])
    assert torch.equal(Squeeze().inverse(y), x)
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("hidden", [0, 8])
@pytest.mark.parametrize("cond_dim", [0, 2])
def test_split_round_trip_and_logdet(cond_dim, hidden):
    torch.manual_seed(0)
    sp = Split(6, cond_dim=cond_dim, hidden=hidden).double()
    x = torch.randn(2, 6, 4, 4, generator=gen(), dtype=torch.float64)
    cond = torch.randn(2, cond_dim, generator=gen(3), dtype=torch.float64) if cond_dim else None
    h, z, ld = sp(x, cond)
    assert torch.equal(h, x[:, :3]) and torch.equal(z, x[:, 3:]) and torch.equal(ld, torch.zeros(2).double())
    randomize(sp, 0.3)
    _, ld = check_forward_inverse(sp, x, cond, atol=1e-12)
    check_logdet(sp, x, cond, ld, atol=1e-9)
    assert float(ld.detach().abs().min()) > 0.1


def test_split_prior_network_sees_the_whole_map():
    """With ``hidden`` the prior of z at one corner follows h at the opposite corner (map-level context, through
    the kept half's mean and std); the linear 3x3 prior only sees a pixel's neighbours."""
    x = torch.randn(1, 6, 8, 8, generator=gen(), dtype=torch.float64)
    far = x.clone()
    far[:, :3, 7, 7] += 3.0
    for hidden, moves in ((0, False), (8, True)):
        torch.manual_seed(0)
        sp = Split(6, hidden=hidden).double()
        randomize(sp, 0.3)
        with torch.no_grad():
            m0, s0 = sp._mean_logsd(x[:, :3], None)
            m1, s1 = sp._mean_logsd(far[:, :3], None)
        changed = float((m1 - m0)[..., 0, 0].abs().max() + (s1 - s0)[..., 0, 0].abs().max())
        assert (changed > 1e-6) is moves, (hidden, changed)
    with pytest.raises(ValueError, match="hidden"):
        Split(6, hidden=-1)


def test_top_prior_round_trip_and_logdet():
    torch.manual_seed(0)
    tp = TopPrior(4, cond_dim=2).double()
    randomize(tp, 0.5)
    x = torch.randn(3, 4, 2, 2, generator=gen(), dtype=torch.float64)
    cond = torch.randn(3, 2, generator=gen(5), dtype=torch.float64)
    _, ld = check_forward_inverse(tp, x, cond, atol=1e-12)
    check_logdet(tp, x, cond, ld, atol=1e-9)
    fixed = TopPrior(4, learn=False)
    assert fixed.trivial and len(list(fixed.parameters())) == 0


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_flowstep_round_trip_and_logdet(coupling):
    torch.manual_seed(0)
    st = FlowStep(4, hidden=8, cond_dim=2, padding="circular", coupling=coupling).double()
    assert isinstance(st.coupling, AffineCoupling if coupling == "affine" else SplineCoupling)
    x = torch.randn(2, 4, 4, 4, generator=gen(), dtype=torch.float64)
    cond = torch.randn(2, 2, generator=gen(4), dtype=torch.float64)
    st(x, cond)  # data-dependent init
    randomize(st, 0.3)
    _, ld = check_forward_inverse(st, x, cond, atol=1e-11 if coupling == "affine" else 1e-10)
    check_logdet(st, x, cond, ld, atol=1e-9)
    with pytest.raises(ValueError, match="^coupling must be 'affine' or 'spline', got 'x'$"):
        FlowStep(4, hidden=8, coupling="x")


# -- Preprocess -----------------------------------------------------------------------------------------------
def test_preprocess_default_is_identity():
    pre = Preprocess(2)
    x = torch.randn(3, 2, 4, 4, generator=gen())
    y, ld = pre(x)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(3))
    assert not pre.is_fitted


def test_preprocess_standardisation_density_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.normal([0.01, -0.02], [0.02, 0.05], size=(400, 8, 8, 2)).transpose(0, 3, 1, 2)
    pre = Preprocess(2)
    pre.fit(torch.tensor(maps))
    assert pre.is_fitted
    np.testing.assert_allclose(pre.mean.numpy(), maps.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(pre.std.numpy(), maps.std(axis=(0, 2, 3)), rtol=1e-10)
    x = torch.tensor(maps[:3])
    y, ld = pre(x)  # buffers only: no autograd graph
    # density of x under "y is standard normal" = N(x; mean, std) per pixel (analytic, scipy)
    lp = stats.norm.logpdf(y.numpy()).sum(axis=(1, 2, 3)) + ld.numpy()
    ref = stats.norm.logpdf(
        maps[:3], loc=pre.mean.numpy()[None, :, None, None], scale=pre.std.numpy()[None, :, None, None]
    ).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    torch.testing.assert_close(pre.inverse(y), x, rtol=0, atol=1e-15)


def test_preprocess_shifted_log_density_matches_lognormal():
    # κ = exp(g) - λ with g ~ N(mu, s^2) is a shifted lognormal; scipy gives its density independently.
    lam, mu, s = 0.03, math.log(0.03), 0.4
    rng = np.random.default_rng(1)
    kappa = np.exp(rng.normal(mu, s, size=(5, 1, 6, 6))) - lam
    pre = Preprocess(1, log_shift=True, shift=lam)
    with torch.no_grad():
        pre.mean.fill_(mu)
        pre.std.fill_(s)
    x = torch.tensor(kappa)
    y, ld = pre(x)
    lp = stats.norm.logpdf(y.numpy()).sum(axis=(1, 2, 3)) + ld.numpy()
    ref = stats.lognorm.logpdf(kappa, s=s, loc=-lam, scale=math.exp(mu)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lp, ref, rtol=1e-10)
    torch.testing.assert_close(pre.inverse(y), x, rtol=0, atol=1e-14)


def test_preprocess_fit_shift_has_margin_and_log_stats():
    rng = np.random.default_rng(2)
    kappa = torch.tensor(np.exp(rng.normal(-3.5, 0.5, size=(200, 1, 8, 8))) - 0.03)
    pre = Preprocess(1, log_shift=True, margin=0.5)
    with pytest.raises(ValueError, match="shift"):
        pre(kappa)  # no shift yet
    pre.fit(kappa)
    k = kappa.numpy()
    np.testing.assert_allclose(float(pre.shift[0]), -k.min() + 0.5 * k.std(), rtol=1e-10)
    u = np.log(k + float(pre.shift[0]))
    np.testing.assert_allclose([float(pre.mean[0]), float(pre.std[0])], [u.mean(), u.std()], rtol=1e-10)
    y, ld = pre(kappa)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    # a pixel below -shift is outside the support: clamped to the edge, finite but very unlikely
    bad = kappa[:1].clone()
    bad[0, 0, 0, 0] = -10.0
    yb, ldb = pre(bad)
    assert torch.isfinite(yb).all() and torch.isfinite(ldb).all()
    assert float(yb.min()) < -10.0


def test_preprocess_bad_input_and_state_dict():
    with pytest.raises(ValueError, match="maps"):
        Preprocess(2).fit(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="maps"):
        Preprocess(1).fit(torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="maps"):
        Preprocess(1).fit(torch.ones(4, 1, 8, 8))
    with pytest.raises(ValueError, match="shift"):
        Preprocess(1, shift=0.1)  # shift without log_shift
    with pytest.raises(ValueError, match="shift"):
        Preprocess(1, log_shift=True, shift=-0.1)
    with pytest.raises(ValueError, match="maps"):
        Preprocess(1, log_shift=True, shift=0.01).fit(torch.full((2, 1, 4, 4), -0.5))
    with pytest.raises(ValueError, match="log_shift"):
        Preprocess(1).load_state_dict(Preprocess(1, log_shift=True, shift=0.1).state_dict())
    a = Preprocess(1, log_shift=True)
    a.fit(torch.rand(10, 1, 4, 4))
    b = Preprocess(1, log_shift=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(a(x)[0], b(x)[0])
    # statistics stay float64 when the module is cast
    assert b.float().mean.dtype == torch.float64
