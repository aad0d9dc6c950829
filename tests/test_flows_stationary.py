"""StationaryGaussian (the TRENF-style Fourier layer) and the maximum-likelihood shift of the preprocessing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensflow.flows import Glow, Preprocess
from lensflow.flows.preprocess import ml_shift
from lensflow.flows.stationary import StationaryGaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def _grf(n: int, size: int, seed: int, k0: float = 3.0) -> torch.Tensor:
    """Periodic Gaussian random fields [n, 1, size, size] with P(k) ∝ (1 + (k/k0)²)^-1.5 (k in DFT units)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.fft.fftfreq(size, 1.0 / size, dtype=torch.float64)
    p = (1 + (k[:, None] ** 2 + k[None, :] ** 2) / k0**2) ** -1.5
    w = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    return torch.fft.ifft2(torch.fft.fft2(w) * p.sqrt()).real / p.sqrt().mean()


@pytest.mark.parametrize(
    ("channels", "periodic", "cond_dim"), [(1, False, 0), (1, True, 2), (3, False, 0), (2, True, 3)]
)
def test_inverse_and_log_det_against_the_brute_force_jacobian(channels, periodic, cond_dim):
    torch.manual_seed(0)
    layer = StationaryGaussian(channels, 6, periodic=periodic, knots=4, cond_dim=cond_dim).double()
    x = torch.randn(32, channels, 6, 6, dtype=torch.float64) * torch.linspace(0.3, 2.0, 6, dtype=torch.float64)
    layer.initialize(x)
    with torch.no_grad():  # away from the whitening initialisation
        layer.raw.add_(0.2 * torch.randn_like(layer.raw))
        if cond_dim:
            layer.cond_proj.weight.normal_(0.0, 0.3)
    cond = torch.randn(3, cond_dim, dtype=torch.float64) if cond_dim else None
    y, logdet = layer(x[:3], cond)
    torch.testing.assert_close(layer.inverse(y, cond), x[:3], rtol=0, atol=1e-12)
    for i in range(3):
        c = None if cond is None else cond[i : i + 1]

        def f(v, c=c):
            return layer(v.view(1, channels, 6, 6), c)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        assert float(logdet[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-9)


def test_data_initialisation_whitens_a_stationary_field_and_is_never_repeated():
    x = _grf(256, 32, seed=1)
    layer = StationaryGaussian(1, 32, periodic=True, knots=16).double()
    y, _ = layer(x)
    assert layer.is_initialized
    # every Hartley mode of the whitened maps has unit variance (the spectrum is smooth, so knots suffice)
    b = layer.basis
    per_mode = (b @ y[:, 0] @ b.T).var(dim=0)
    assert float(per_mode.mean()) == pytest.approx(1.0, abs=0.03)
    assert float((per_mode - 1).abs().quantile(0.5)) < 0.15
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    fresh = StationaryGaussian(1, 32, periodic=True, knots=16).double()
    fresh.load_state_dict(state)
    fresh(3.0 * x[:8])  # a reloaded layer does not re-initialise on other data
    torch.testing.assert_close(fresh.raw, state["raw"])


def test_whitening_alone_reaches_the_exact_likelihood_of_a_periodic_gaussian_field():
    # TRENF's point: the stationary layer fits the Gaussian part exactly, here all of the field
    size, n = 32, 512
    x = _grf(n, size, seed=2)
    k = torch.fft.fftfreq(size, 1.0 / size, dtype=torch.float64)
    p = (1 + (k[:, None] ** 2 + k[None, :] ** 2) / 9.0) ** -1.5
    p = p / p.sqrt().mean() ** 2
    xh = torch.fft.fft2(x[:, 0])
    exact = -0.5 * ((xh.abs() ** 2 / p).sum((1, 2)) / size**2 + torch.log(p).sum() + size**2 * math.log(2 * math.pi))
    layer = StationaryGaussian(1, size, periodic=True, knots=24).double()
    layer.initialize(_grf(2048, size, seed=3))
    y, logdet = layer(x)
    model = -0.5 * (y**2).sum((1, 2, 3)) - 0.5 * size**2 * math.log(2 * math.pi) + logdet
    gap = float((exact - model).mean()) / (size**2 * math.log(2))
    assert abs(gap) < 2e-3, gap


def test_glow_with_a_stationary_layer_round_trips_and_rebuilds_from_its_config():
    glow = Glow(2, 16, levels=2, steps=2, hidden=8, cond_dim=2, stationary=True, init_seed=0).double()
    x = 0.01 * torch.randn(8, 2, 16, 16, dtype=torch.float64)
    cond = torch.randn(8, 2, dtype=torch.float64)
    glow.initialize(x, cond)
    zs = glow.encode(x, cond)
    torch.testing.assert_close(glow.decode(zs, cond), x, rtol=0, atol=1e-10)
    again = Glow.from_config(glow.config).double()
    again.load_state_dict(glow.state_dict())
    torch.testing.assert_close(again.log_prob(x, cond), glow.log_prob(x, cond))
    assert glow.config["stationary"] and not Glow(1, 16, 2, 1, 8).config["stationary"]


def test_ml_shift_recovers_the_lognormal_shift():
    rng = np.random.default_rng(0)
    lam, s2 = 0.03, 0.25
    g = rng.normal(0.0, math.sqrt(s2), 2_000_000)
    kappa = lam * np.expm1(g - s2 / 2)
    assert ml_shift(kappa) == pytest.approx(lam, rel=0.01)
    pre = Preprocess(1, log_shift=True, shift_method="ml")
    pre.fit(kappa.reshape(-1, 1, 100, 100)[:100])
    assert float(pre.shift[0]) == pytest.approx(lam, rel=0.02)
    margin = Preprocess(1, log_shift=True)  # the old rule puts the edge one σ below the lowest pixel
    margin.fit(kappa.reshape(-1, 1, 100, 100)[:100])
    assert float(margin.shift[0]) > lam + 0.5 * kappa.std()


def test_unknown_shift_method_is_one_line():
    with pytest.raises(ValueError, match="shift_method must be one of"):
        Preprocess(1, log_shift=True, shift_method="guess")
    with pytest.raises(ValueError, match="shift_scale must be a number >= 1"):
        Preprocess(1, log_shift=True, shift_method="ml", shift_scale=0.5)
    with pytest.raises(ValueError, match="scales the ml shift; shift_method is 'margin'"):
        Preprocess(1, log_shift=True, shift_method="margin", shift_scale=2.0)


def test_shift_scale_multiplies_the_ml_shift_and_keeps_an_exact_density():
    """``shift_scale`` = 2 doubles the maximum-likelihood λ; the preprocessing stays a bijection whose log-det is the
    analytic one, and a Glow saved before the key existed rebuilds with 1."""
    rng = np.random.default_rng(1)
    lam, s2 = 0.03, 0.25
    kappa = (lam * np.expm1(rng.normal(0.0, math.sqrt(s2), 400_000) - s2 / 2)).reshape(-1, 1, 20, 20)
    one = Preprocess(1, log_shift=True, shift_method="ml")
    two = Preprocess(1, log_shift=True, shift_method="ml", shift_scale=2.0)
    one.fit(kappa)
    two.fit(kappa)
    assert float(two.shift[0]) == pytest.approx(2 * float(one.shift[0]), rel=1e-12)
    x = torch.as_tensor(kappa[:8])
    y, logdet = two(x)
    shifted = x.double() + 2 * float(one.shift[0])
    want = -(torch.log(shifted).sum(dim=(1, 2, 3)) + x[0].numel() * torch.log(two.std[0]))
    torch.testing.assert_close(logdet.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two.inverse(y).double(), x.double(), rtol=1e-5, atol=1e-7)
    glow = Glow(1, 16, 2, 1, 8, preprocess=Preprocess(1, log_shift=True, shift_method="ml", shift_scale=1.5))
    assert Glow.from_config(glow.config).preprocess.shift_scale == 1.5
    old = {k: v for k, v in glow.config.items() if k != "shift_scale"}
    assert Glow.from_config(old).preprocess.shift_scale == 1.0


@pytest.mark.parametrize(("channels", "periodic", "cond_dim"), [(1, False, 0), (2, False, 2)])
def test_the_low_mode_block_inverts_and_has_the_brute_force_log_det(channels, periodic, cond_dim):
    torch.manual_seed(1)
    layer = StationaryGaussian(channels, 6, periodic=periodic, knots=4, cond_dim=cond_dim, low_modes=3).double()
    x = torch.randn(64, channels, 6, 6, dtype=torch.float64)
    x = x + 0.5 * x.mean(dim=(2, 3), keepdim=True)  # correlated large scales
    layer.initialize(x)
    with torch.no_grad():
        layer.low.add_(0.1 * torch.randn_like(layer.low))
    cond = torch.randn(2, cond_dim, dtype=torch.float64) if cond_dim else None
    y, logdet = layer(x[:2], cond)
    torch.testing.assert_close(layer.inverse(y, cond), x[:2], rtol=0, atol=1e-12)
    c0 = None if cond is None else cond[:1]
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, channels, 6, 6), c0)[0].reshape(-1), x[0].reshape(-1)
    )
    assert float(logdet[0].detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-9)


def test_the_low_mode_block_whitens_the_correlated_large_scales_of_crops():
    # crops of a periodic field twice their size: the lowest DCT modes correlate (a diagonal filter misses it)
    big = _grf(2000, 32, seed=4, k0=1.5)[:, :, :16, :16]
    layer = StationaryGaussian(1, 16, periodic=False, knots=12, low_modes=4).double()
    y, _ = layer(big)
    b = layer.basis
    low = (b @ y[:, 0] @ b.T)[:, :4, :4].reshape(len(y), -1)
    corr = torch.corrcoef(low.T)
    off = corr - torch.eye(16, dtype=corr.dtype)
    assert float(off.abs().max()) < 0.1  # whitened (noise ~ 1/sqrt(2000) per coefficient, max over 120 pairs)
    plain = StationaryGaussian(1, 16, periodic=False, knots=12).double()
    yp, _ = plain(big)
    lowp = (b @ yp[:, 0] @ b.T)[:, :4, :4].reshape(len(y), -1)
    assert float((torch.corrcoef(lowp.T) - torch.eye(16, dtype=corr.dtype)).abs().max()) > 0.2  # what it fixes


def test_too_few_maps_leave_the_low_mode_block_at_the_identity():
    x = _grf(20, 16, seed=7)  # 20 maps for a 16-dimensional block: fewer than 4 per dimension
    with_low = StationaryGaussian(1, 16, knots=6, low_modes=4).double()
    plain = StationaryGaussian(1, 16, knots=6).double()
    with_low.initialize(x)
    plain.initialize(x)
    assert float(with_low.low.abs().max()) == 0.0
    torch.testing.assert_close(with_low(x)[0], plain(x)[0], rtol=0, atol=1e-12)
