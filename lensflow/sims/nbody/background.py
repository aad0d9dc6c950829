"""Background and growth of a particle-mesh run: E(a), χ(a), D₁, D₂ and FastPM's growth-corrected factors.

Units: comoving lengths in Mpc/h, time in 1/H₀ (so H₀ = 1), the scale factor ``a`` as the clock.

The linear growth is integrated here (not read from pyccl) so that the kick and drift factors of
:mod:`lensflow.sims.nbody.pm` are *exactly* consistent with the growth they reproduce: with
``G_f(a) = a³ E(a) dD/da`` the growth equation is ``dG_f/da = (3/2) Ω_cb D / (a² E)`` (Feng et al. 2016,
arXiv:1603.00476, eqs. 17–22), and the same ``g_f = dG_f/da`` divides the kick. ``E(a) = H(a)/H₀`` comes from
pyccl (radiation, massive neutrinos and dark energy in the background), and the clustering matter is CDM plus
baryons, Ω_cb: massive neutrinos are treated as smooth, which is what a PM code without neutrino particles does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from lensflow.sims.theory import ccl_cosmology

#: H₀/c in h/Mpc.
H0_OVER_C = 1.0 / 2997.92458

__all__ = ["H0_OVER_C", "Background", "background"]


@dataclass(frozen=True)
class Background:
    """Tabulated background of one cosmology on a grid of ``a``, with interpolating accessors."""

    omega_cb: float  # clustering matter density today (CDM + baryons)
    omega_m: float  # total matter density today (massive neutrinos included)
    a: np.ndarray  # [n] increasing scale factors
    e: np.ndarray  # E(a) = H/H₀
    d1: np.ndarray  # linear growth, D₁(1) = 1
    gf: np.ndarray  # a³ E dD₁/da
    chi: np.ndarray  # comoving distance to a, Mpc/h

    def _at(self, table: np.ndarray, a: float | np.ndarray) -> np.ndarray | float:
        return np.interp(np.log(a), np.log(self.a), table)

    def E(self, a: float | np.ndarray) -> Any:  # noqa: N802 - the field's name for H/H0
        """H(a)/H₀."""
        return self._at(self.e, a)

    def D1(self, a: float | np.ndarray) -> Any:  # noqa: N802
        """Linear growth factor, 1 today."""
        return self._at(self.d1, a)

    def f1(self, a: float | np.ndarray) -> Any:
        """Linear growth rate dlnD₁/dlna."""
        return self._at(self.gf, a) / (np.asarray(a) ** 2 * self.E(a) * self.D1(a))

    def D2(self, a: float | np.ndarray) -> Any:  # noqa: N802
        """Second-order growth in the convention x = q + D₁Ψ₁ + D₂Ψ₂ with Ψ₂ built from (3/7)·source: D₂ ≈ D₁²."""
        return np.asarray(self.D1(a)) ** 2 * self._omega_a(a) ** (-1.0 / 143.0)

    def f2(self, a: float | np.ndarray) -> Any:
        """Second-order growth rate, 2 Ω_cb(a)^{6/11} (Bouchet et al. 1995)."""
        return 2.0 * self._omega_a(a) ** (6.0 / 11.0)

    def _omega_a(self, a: float | np.ndarray) -> Any:
        a = np.asarray(a, float)
        return self.omega_cb / (a**3 * np.asarray(self.E(a)) ** 2)

    def Gf(self, a: float | np.ndarray) -> Any:  # noqa: N802
        """a³ E dD₁/da: the momentum of a linear displacement of unit amplitude."""
        return self._at(self.gf, a)

    def gf_rate(self, a: float | np.ndarray) -> Any:
        """dG_f/da from the growth equation itself, (3/2) Ω_cb D₁ / (a² E): exact, not a finite difference."""
        a = np.asarray(a, float)
        return 1.5 * self.omega_cb * np.asarray(self.D1(a)) / (a**2 * np.asarray(self.E(a)))

    def gp_rate(self, a: float | np.ndarray) -> Any:
        """dD₁/da = G_f / (a³ E)."""
        a = np.asarray(a, float)
        return np.asarray(self.Gf(a)) / (a**3 * np.asarray(self.E(a)))

    def kick_factor(self, ai: float, ac: float, af: float) -> float:
        """Δp = factor · F(a_c) moving the momentum from ``ai`` to ``af`` (FastPM: exact for linear growth)."""
        return float((self.Gf(af) - self.Gf(ai)) / (ac**2 * self.E(ac) * self.gf_rate(ac)))

    def drift_factor(self, ai: float, ac: float, af: float) -> float:
        """Δx = factor · p(a_c) moving positions from ``ai`` to ``af`` (FastPM: exact for linear growth)."""
        return float((self.D1(af) - self.D1(ai)) / (ac**3 * self.E(ac) * self.gp_rate(ac)))

    def chi_of_a(self, a: float | np.ndarray) -> Any:
        """Comoving distance, Mpc/h."""
        return self._at(self.chi, a)

    def a_of_chi(self, chi: float | np.ndarray) -> Any:
        """Scale factor at comoving distance ``chi`` (Mpc/h)."""
        # chi decreases with a: interpolate on the reversed table
        return np.exp(np.interp(chi, self.chi[::-1], np.log(self.a)[::-1]))


def background(cosmology: Mapping[str, Any], a_min: float = 1e-3, n: int = 2048) -> Background:
    """The background of ``cosmology`` (lensflow's cosmology dict) tabulated for ``a_min <= a <= 1``."""
    cosmo = ccl_cosmology(cosmology, nonlinear=False)
    omega_cb = float(cosmo["Omega_c"] + cosmo["Omega_b"])
    omega_m = float(cosmology["Omega_m"])
    a = np.exp(np.linspace(math.log(a_min), 0.0, n))
    import pyccl as ccl

    e = np.asarray(ccl.h_over_h0(cosmo, a), float)
    h = float(cosmology["h"])
    chi = np.asarray(ccl.comoving_radial_distance(cosmo, a), float) * h

    def e_of(x: float) -> float:
        return float(np.interp(math.log(x), np.log(a), e))

    def rhs(x: float, y: np.ndarray) -> list[float]:
        ex = e_of(x)
        return [y[1] / (x**3 * ex), 1.5 * omega_cb * y[0] / (x**2 * ex)]

    # Growing mode deep in matter domination: D ∝ a, so G_f = a³ E · 1.
    y0 = [a_min, a_min**3 * e_of(a_min)]
    sol = solve_ivp(rhs, (a_min, 1.0), y0, t_eval=a, rtol=1e-10, atol=1e-14, method="DOP853")
    if not sol.success:  # pragma: no cover - smooth ODE
        raise RuntimeError(f"growth integration failed: {sol.message}")
    d1, gf = sol.y
    norm = d1[-1]
    return Background(omega_cb, omega_m, a, e, d1 / norm, gf / norm, chi)
