"""Log-likelihoods of maps on a parameter grid: the emulator's, the exact one, and the binned-C_ℓ Gaussian one.

Each function returns ``[n_maps, n_nodes]`` nats (additive constants per map dropped where noted), to be
turned into posteriors by :class:`lensflow.inference.posterior.GridPosterior`.

- :func:`emulator_loglike`: the conditional emulator's field-level ``log p(κ | θ)``, all maps at one node per
  batch of forward passes.
- :func:`exact_loglike`: the simulator's exact ``log p(κ | θ)`` (:class:`lensflow.sims.truth.StoreTruth`): one
  simulator set-up and one covariance factorization per node, reused for every map.
- :class:`ClLikelihood`: a Gaussian likelihood of the binned power spectrum (lensflow's C_ℓ convention). Its
  mean at every θ is the *exact* expectation of the estimator on the simulator's crops (the crop's pixel
  covariance folded with the pair-count window, so mode coupling by the crop is included), its covariance is
  estimated from simulations at one fiducial θ (the usual fixed-covariance analysis), with the Hartlap factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from lensflow._util.log import get_logger
from lensflow._util.progress import progress
from lensflow.sims.flat import FlatSimulator
from lensflow.stats import SummaryConfig, summarize

if TYPE_CHECKING:
    from lensflow.emulator import Emulator

__all__ = ["ClLikelihood", "emulator_loglike", "exact_loglike", "expected_cl"]

log = get_logger(__name__)


def emulator_loglike(
    emulator: Emulator, maps: np.ndarray, nodes: np.ndarray, *, batch_size: int = 256, show_progress: bool = True
) -> np.ndarray:
    """The emulator's ``log p(κ_i | θ_g)`` [n, G] in nats for maps [n, C, H, W] and nodes [G, P] (physical θ)."""
    n, g = maps.shape[0], nodes.shape[0]
    out = np.empty((n, g))
    bar = progress(g, unit="θ", desc="emulator likelihood", enabled=show_progress)
    for j in range(g):
        out[:, j] = emulator.log_prob(maps, cond=np.broadcast_to(nodes[j], (n, nodes.shape[1])), batch_size=batch_size)
        bar.update(1)
    bar.close()
    return out


def exact_loglike(
    simulator_at: Callable[[np.ndarray], FlatSimulator],
    maps: np.ndarray,
    nodes: np.ndarray,
    *,
    show_progress: bool = True,
    on_simulator: Callable[[int, FlatSimulator], None] | None = None,
) -> np.ndarray:
    """The exact ``log p(κ_i | θ_g)`` [n, G]: ``simulator_at(θ)`` builds the simulator of node θ (physical).

    ``on_simulator(g, sim)`` is called with each node's simulator while it is alive (the C_ℓ likelihood uses it
    to compute its expected spectra without building the simulators twice).
    """
    out = np.empty((maps.shape[0], nodes.shape[0]))
    bar = progress(nodes.shape[0], unit="θ", desc="exact likelihood", enabled=show_progress)
    for j, theta in enumerate(nodes):
        sim = simulator_at(theta)
        out[:, j] = sim.log_prob(maps)
        if on_simulator is not None:
            on_simulator(j, sim)
        sim.likelihood._chol = None  # the 128 MB factor of a 64² crop: free it before the next node
        bar.update(1)
    bar.close()
    return out


def expected_cl(sim: FlatSimulator, config: SummaryConfig) -> np.ndarray:
    """The exact expectation of lensflow's binned C_ℓ estimator on ``sim``'s maps, float64 [C(C+1)/2 or C, bins].

    E|FFT κ(k)|² over an N×N crop is Σ_Δ ξ_κ(Δ) (N − |Δx|)(N − |Δy|) e^{−ik·Δ}, with ξ_κ the map's lag covariance
    (λ² (e^ξ_g − 1) for the shifted lognormal, ξ_g for the Gaussian kind); binned with the estimator's own
    mode weights by running :func:`lensflow.stats.summarize` on the expected |FFT|² turned back into a field.
    """
    lik = sim.likelihood
    xi = lik.lag_covariance()  # [C, C, M, M]
    if lik.shift is not None:
        lam = lik.shift
        xi = lam[:, None, None, None] * lam[None, :, None, None] * np.expm1(xi)
    n, m = lik.npix, lik.grid
    lags = np.arange(-(n - 1), n)
    window = (n - np.abs(lags))[:, None] * (n - np.abs(lags))[None, :]
    sub = xi[:, :, lags[:, None] % m, lags[None, :] % m] * window  # [C, C, 2n-1, 2n-1]
    # |FFT|² at the crop's own frequencies k = 2π j / N: sum over lags with the phase e^{-ik·Δ}
    phase = np.exp(-2j * np.pi * np.outer(np.arange(n), lags) / n)  # [N, 2n-1]
    power = np.einsum("ka,ijab,lb->ijkl", phase, sub, phase).real  # [C, C, N, N]
    return _binned(power, config)


def _binned(power: np.ndarray, config: SummaryConfig) -> np.ndarray:
    """Bin an expected |FFT|² [C, C, N, N] with summarize's C_ℓ estimator (its own mode weights and edges).

    The estimator is linear in |FFT|², so a field whose |FFT|² equals the expectation gives the expected C_ℓ:
    for auto spectra we hand summarize a field with that amplitude and zero phase; for cross spectra the
    polarisation identity E[a b] = (E|a+b|² − E|a−b|²)/4 gives them from auto spectra.
    """
    c = power.shape[0]
    one = SummaryConfig.from_dict({**config.to_dict(), "statistics": ("cl",), "cross": False})

    def auto(p: np.ndarray) -> np.ndarray:
        field = np.fft.ifft2(np.sqrt(np.clip(p, 0.0, None))).real  # |FFT(field)|² = p where p is Hermitian-even
        # the real part keeps |FFT|² exact only for even p: symmetrise explicitly
        return summarize(torch.from_numpy(field[None, None]), one)["cl"].numpy()[0]

    if c == 1:
        return auto(_even(power[0, 0]))[None]
    rows = []
    for i in range(c):
        for j in range(i, c):
            if i == j:
                rows.append(auto(_even(power[i, i]))[0])
            else:
                plus = power[i, i] + power[j, j] + 2 * power[i, j]
                minus = power[i, i] + power[j, j] - 2 * power[i, j]
                rows.append((auto(_even(plus))[0] - auto(_even(minus))[0]) / 4.0)
    return np.stack(rows)


def _even(p: np.ndarray) -> np.ndarray:
    """Symmetrise p(k) = p(−k) on the FFT grid (the expectation is even; round-off is not)."""
    n = p.shape[0]
    idx = (-np.arange(n)) % n
    return 0.5 * (p + p[idx][:, idx])


class ClLikelihood:
    """Gaussian likelihood of binned C_ℓ: exact mean at each θ, covariance from fiducial simulations.

    Args:
        config: the C_ℓ binning (a :class:`SummaryConfig` with ``cl``; lensflow's conventions).
        fiducial_maps: simulated maps [N, C, H, W] at the fiducial θ for the covariance (N ≫ bins).
    """

    def __init__(self, config: SummaryConfig, fiducial_maps: np.ndarray) -> None:
        self.config = SummaryConfig.from_dict({**config.to_dict(), "statistics": ("cl",)})
        cls = self.measure(fiducial_maps)
        n, p = cls.shape
        if n < p + 3:
            raise ValueError(f"cl: {n} fiducial maps for {p} bins; the covariance needs many more maps than bins")
        self.hartlap = (n - p - 2) / (n - 1)
        self.inv = self.hartlap * np.linalg.inv(np.cov(cls, rowvar=False))
        self.means: dict[int, np.ndarray] = {}

    def measure(self, maps: np.ndarray) -> np.ndarray:
        """Binned C_ℓ of maps [n, C, H, W], flattened [n, bins]."""
        res = summarize(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64)), self.config)["cl"]
        return res.numpy().reshape(maps.shape[0], -1)

    def add_node(self, index: int, sim: FlatSimulator) -> None:
        """Record the exact mean C_ℓ of node ``index`` from its simulator."""
        self.means[index] = expected_cl(sim, self.config).reshape(-1)

    def loglike(self, maps: np.ndarray, n_nodes: int) -> np.ndarray:
        """``−½ (Ĉ − μ(θ))ᵀ Σ⁻¹ (Ĉ − μ(θ))`` [n, G] (the θ-independent covariance drops out of the posterior)."""
        missing = [g for g in range(n_nodes) if g not in self.means]
        if missing:
            raise ValueError(f"cl: no mean C_ell for nodes {missing[:5]}")
        c = self.measure(maps)  # [n, B]
        mu = np.stack([self.means[g] for g in range(n_nodes)])  # [G, B]
        d = c[:, None, :] - mu[None]
        return -0.5 * np.einsum("ngb,bc,ngc->ng", d, self.inv, d)
