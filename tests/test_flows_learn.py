"""It learns: on Gaussian random fields of known spectrum, Glow's held-out bits/dim approach the exact
Gaussian likelihood, computed independently with FFTs."""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers.fields import periodic_grf

from lensflow.flows import Glow, Preprocess

N = 16  # pixels per side


def _spectrum() -> np.ndarray:
    """Power per DFT mode (symmetric under k -> -k), red: neighbouring pixels strongly correlated."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(N) * N, np.fft.fftfreq(N) * N, indexing="ij"))
    p = (1.0 + (k / 2.0) ** 2) ** -1.5
    return p * (1e-4 / p.mean())  # pixel variance 1e-4: κ-like amplitude, std 0.01


def _exact_log_prob(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """log N(x; 0, C) for the circulant C with eigenvalues P: the DFT diagonalises C (nats per map)."""
    xk = np.fft.fft2(x)
    quad = (np.abs(xk) ** 2 / p).sum(axis=(1, 2)) / N**2  # x^T C^-1 x via Parseval
    return -0.5 * quad - 0.5 * np.log(p).sum() - 0.5 * N**2 * math.log(2 * math.pi)


def test_exact_reference_agrees_with_dense_gaussian():
    # guard the reference itself: dense covariance from samples' analytic form, scipy-free
    p = _spectrum()
    idx = np.arange(N * N)
    basis = np.eye(N * N).reshape(N * N, N, N)
    cov = np.fft.ifft2(p * np.fft.fft2(basis)).real.reshape(N * N, N * N)  # C e_j columns
    x = periodic_grf(3, np.sqrt(p), np.random.default_rng(0)).reshape(3, -1)
    sign, logdet = np.linalg.slogdet(cov)
    dense = (
        -0.5 * np.einsum("bi,ij,bj->b", x, np.linalg.inv(cov), x)
        - 0.5 * logdet
        - 0.5 * idx.size * math.log(2 * math.pi)
    )
    assert sign > 0
    np.testing.assert_allclose(_exact_log_prob(x.reshape(3, N, N), p), dense, rtol=1e-8)


def test_glow_learns_gaussian_random_field_to_exact_likelihood():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: one thread is fastest and immune to a busy machine
    try:
        p = _spectrum()
        rng = np.random.default_rng(0)

        def batch(n: int) -> torch.Tensor:
            return torch.tensor(periodic_grf(n, np.sqrt(p), rng), dtype=torch.float32)[:, None]

        held_out = periodic_grf(512, np.sqrt(p), rng)
        exact_bpd = float(-_exact_log_prob(held_out, p).mean() / (N * N * math.log(2)))
        x_test = torch.tensor(held_out, dtype=torch.float32)[:, None]

        pre = Preprocess(1)
        pre.fit(batch(1024))
        glow = Glow(1, N, levels=2, steps=4, hidden=32, padding="circular", preprocess=pre, init_seed=0)
        glow.initialize(batch(256))
        with torch.no_grad():
            start_gap = float(glow.bits_per_dim(x_test).mean()) - exact_bpd
        iters = 220
        opt = torch.optim.Adam(glow.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters, pct_start=0.1)
        for _ in range(iters):  # fresh fields every step: no overfitting, the optimum is the true law
            loss = glow.bits_per_dim(batch(64)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            model_bpd = float(glow.bits_per_dim(x_test).mean())
    finally:
        torch.set_num_threads(threads)
    gap = model_bpd - exact_bpd
    assert start_gap > 0.2  # the task is not trivially solved at initialisation
    print(f"held-out bits/dim {model_bpd:.4f}, exact {exact_bpd:.4f}, gap {gap:.4f} (start {start_gap:.3f})")
    assert gap < 0.05, (model_bpd, exact_bpd)
    # the exact law is the best possible model: beating it by more than held-out noise means a wrong density
    assert gap > -0.01, (model_bpd, exact_bpd)
