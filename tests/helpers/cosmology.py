"""The cosmologies the tests use, written once."""

from __future__ import annotations

from lensflow.sims.theory import PLANCK18

#: Planck 2018 with massless neutrinos: pyccl/CAMB set up about 5x faster than with m_nu = 0.06 eV.
PLANCK18_MASSLESS: dict[str, float] = {**PLANCK18, "m_nu": 0.0}

#: A round-number flat ΛCDM (no neutrino mass), for statistics tests that need some cosmology.
SIMPLE: dict[str, float] = {"Omega_m": 0.3, "Omega_b": 0.045, "h": 0.7, "sigma_8": 0.8, "n_s": 0.96}
