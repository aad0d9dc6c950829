"""Theory angular power spectra of the weak-lensing convergence κ (pyccl, halofit).

Conventions
-----------
``cosmology`` is a plain dict with the keys ``Omega_m`` (total matter today, massive neutrinos
included), ``Omega_b``, ``h``, ``sigma_8``, ``n_s`` and optionally ``w0`` (default -1), ``wa``
(default 0), ``m_nu`` (sum of neutrino masses in eV, default 0) and ``transfer_function``
(pyccl name, default ``"boltzmann_camb"``). Space is flat.

``z_source`` describes one or several source bins (channels):

* a float: one source plane at that redshift;
* a pair ``(z, n(z))`` of 1-d arrays (at least 2 samples each): one bin with that redshift
  distribution (normalised internally);
* a sequence of the above: several tomographic bins. Items may also be mappings
  ``{"z": [...], "nz": [...]}`` (the form used in YAML configs).

A single source plane uses pyccl's own thin-plane κ kernel (``CMBLensingTracer``, valid for any
source redshift, so no artificially narrow n(z) is needed); an n(z) bin uses pyccl's lensing
kernel with the κ (not shear) angular prefactor ℓ(ℓ+1)/(ℓ+½)². Both go through pyccl's Limber
integral with the halofit non-linear matter power spectrum (Takahashi et al. 2012).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REQUIRED_KEYS: tuple[str, ...] = ("Omega_m", "Omega_b", "h", "sigma_8", "n_s")
OPTIONAL_KEYS: dict[str, Any] = {"w0": -1.0, "wa": 0.0, "m_nu": 0.0, "transfer_function": "boltzmann_camb"}

#: Planck 2018 TT,TE,EE+lowE+lensing+BAO best fit (Planck Collaboration 2020, A&A 641, A6,
#: Table 2, last column): H0 = 67.66, Omega_m = 0.3111, Omega_b h^2 = 0.02242, sigma_8 = 0.8102,
#: n_s = 0.9665, one massive neutrino of 0.06 eV.
PLANCK18: dict[str, float] = {
    "Omega_m": 0.3111,  # total matter today, massive neutrinos included
    "Omega_b": 0.04897,  # 0.02242 / h^2
    "h": 0.6766,
    "sigma_8": 0.8102,
    "n_s": 0.9665,
    "m_nu": 0.06,  # eV, sum of neutrino masses (0 is ~5x faster to set up: no massive-neutrino CAMB run)
}

#: A source: a plane redshift, or an n(z) given as (z, n) arrays.
Source = float | tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------


def check_cosmology(cosmology: Mapping[str, Any]) -> dict[str, Any]:
    """Validated copy of a cosmology dict with the optional keys filled in."""
    if not isinstance(cosmology, Mapping):
        raise ValueError(f"cosmology must be a mapping with keys {list(REQUIRED_KEYS)}, got {type(cosmology).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in cosmology]
    if missing:
        raise ValueError(f"cosmology is missing {missing}; required keys are {list(REQUIRED_KEYS)}")
    unknown = [k for k in cosmology if k not in REQUIRED_KEYS and k not in OPTIONAL_KEYS]
    if unknown:
        raise ValueError(
            f"cosmology has unknown keys {unknown}; allowed are {list(REQUIRED_KEYS) + list(OPTIONAL_KEYS)}"
        )
    out: dict[str, Any] = dict(OPTIONAL_KEYS)
    for k, v in cosmology.items():
        if k == "transfer_function":
            out[k] = str(v)
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"cosmology[{k!r}] must be a number, got {v!r}") from None
        if not math.isfinite(out[k]):
            raise ValueError(f"cosmology[{k!r}] must be finite, got {v!r}")
    for k in ("Omega_m", "Omega_b", "h", "sigma_8", "n_s"):
        if out[k] <= 0:
            raise ValueError(f"cosmology[{k!r}] must be positive, got {out[k]}")
    if out["m_nu"] < 0:
        raise ValueError(f"cosmology['m_nu'] must be >= 0 eV, got {out['m_nu']}")
    if out["Omega_b"] >= out["Omega_m"]:
        raise ValueError(f"cosmology: Omega_b ({out['Omega_b']}) must be smaller than Omega_m ({out['Omega_m']})")
    return out


def _is_array_pair(obj: Any) -> bool:
    if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, (Sequence, np.ndarray)) or len(obj) != 2:
        return False
    try:
        a, b = (np.asarray(x, dtype=float) for x in obj)
    except (TypeError, ValueError):
        return False
    return a.ndim == 1 and b.ndim == 1 and a.shape == b.shape and a.size >= 2


def _check_nz(z: Any, nz: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(z, dtype=float)
    nz = np.asarray(nz, dtype=float)
    if z.ndim != 1 or z.shape != nz.shape or z.size < 2:
        raise ValueError(f"{where}: n(z) needs two 1-d arrays of equal length >= 2, got shapes {z.shape}, {nz.shape}")
    if not (np.isfinite(z).all() and np.isfinite(nz).all()):
        raise ValueError(f"{where}: n(z) has NaN or Inf values")
    if np.any(np.diff(z) <= 0) or z[0] < 0:
        raise ValueError(f"{where}: n(z) redshifts must be non-negative and strictly increasing")
    if np.any(nz < 0) or not np.any(nz > 0):
        raise ValueError(f"{where}: n(z) must be non-negative and not all zero")
    return z, nz


def parse_sources(z_source: Any) -> list[Source]:
    """Normalise ``z_source`` (see module docstring) to a list of floats and (z, n) array pairs."""
    if isinstance(z_source, (int, float, np.integer, np.floating)) and not isinstance(z_source, bool):
        items: list[Any] = [z_source]
    elif isinstance(z_source, Mapping) or _is_array_pair(z_source):
        items = [z_source]
    elif isinstance(z_source, (Sequence, np.ndarray)) and not isinstance(z_source, (str, bytes)):
        items = list(z_source)
    else:
        raise ValueError(f"z_source must be a redshift, an (z, n(z)) pair or a list of them, got {z_source!r}")
    if not items:
        raise ValueError("z_source is empty; give at least one source redshift or n(z)")
    out: list[Source] = []
    for i, it in enumerate(items):
        where = f"z_source[{i}]"
        if isinstance(it, Mapping):
            if set(it) != {"z", "nz"}:
                raise ValueError(f"{where}: an n(z) mapping needs exactly the keys 'z' and 'nz', got {sorted(it)}")
            out.append(_check_nz(it["z"], it["nz"], where))
        elif np.ndim(it) == 0:
            try:
                z = float(it)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: not a redshift: {it!r}") from None
            if not (math.isfinite(z) and z > 0):
                raise ValueError(f"{where}: source redshift must be positive and finite, got {it!r}")
            out.append(z)
        elif _is_array_pair(it):
            out.append(_check_nz(it[0], it[1], where))
        else:
            raise ValueError(f"{where}: expected a redshift, a (z, n(z)) pair or {{z, nz}}, got {it!r}")
    return out


def source_labels(sources: Sequence[Source]) -> list[float]:
    """One redshift per channel for the map store: the plane redshift, NaN for an n(z) bin."""
    return [float(s) if isinstance(s, float) else float("nan") for s in sources]


def source_zmax(source: Source) -> float:
    """Largest redshift a source bin reaches (the plane itself, or the last n(z) sample with n > 0)."""
    if isinstance(source, float):
        return source
    z, nz = source
    return float(z[np.flatnonzero(nz > 0)[-1]])


# --------------------------------------------------------------------------------------------
# pyccl
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _ccl_cosmology_cached(key: tuple[tuple[str, Any], ...], nonlinear: bool):
    import pyccl as ccl

    c = dict(key)
    common = dict(
        Omega_b=c["Omega_b"],
        h=c["h"],
        sigma8=c["sigma_8"],
        n_s=c["n_s"],
        w0=c["w0"],
        wa=c["wa"],
        m_nu=c["m_nu"],
        transfer_function=c["transfer_function"],
        matter_power_spectrum="halofit" if nonlinear else "linear",
    )
    # Omega_m in the dict includes massive neutrinos; CCL wants CDM alone. The neutrino density
    # depends only on h, the masses and T_CMB, so a throw-away instance (no computation) gives it.
    omega_nu = 0.0
    if c["m_nu"] > 0:
        omega_nu = float(ccl.Cosmology(Omega_c=0.25, **common)["Omega_nu_mass"])
    omega_c = c["Omega_m"] - c["Omega_b"] - omega_nu
    if omega_c <= 0:
        raise ValueError(
            f"cosmology: Omega_m={c['Omega_m']} leaves no cold dark matter after Omega_b="
            f"{c['Omega_b']} and Omega_nu={omega_nu:.4g}"
        )
    try:
        return ccl.Cosmology(Omega_c=omega_c, **common)
    except Exception as e:  # noqa: BLE001 - CCL raises its own error types for bad parameters
        raise ValueError(f"cosmology {c} rejected by pyccl: {e}") from None


def ccl_cosmology(cosmology: Mapping[str, Any], nonlinear: bool = True):
    """A (cached) :class:`pyccl.Cosmology` for a cosmology dict; halofit if ``nonlinear``."""
    c = check_cosmology(cosmology)
    return _ccl_cosmology_cached(tuple(sorted(c.items())), bool(nonlinear))


def kappa_tracer(cosmo: Any, source: Source, n_samples: int = 256):
    """pyccl tracer of the convergence κ of one source bin (plane or n(z))."""
    import pyccl as ccl

    if isinstance(source, float):
        return ccl.CMBLensingTracer(cosmo, z_source=source, n_samples=n_samples)
    z, nz = source
    tracer = ccl.Tracer()
    cosmo.compute_distances()
    kernel = ccl.tracers.get_lensing_kernel(cosmo, dndz=(z, nz), n_chi=max(n_samples, 2 * z.size))
    # der_angles=1 gives ℓ(ℓ+1)/(ℓ+½)², the convergence prefactor (=2 would be the shear's).
    tracer.add_tracer(cosmo, kernel=kernel, der_bessel=-1, der_angles=1)
    return tracer


def convergence_cl(
    ell: np.ndarray | Sequence[float] | float,
    cosmology: Mapping[str, Any],
    z_source: Any,
    *,
    nonlinear: bool = True,
    l_limber: int = -1,
    n_samples: int = 256,
) -> np.ndarray:
    """Angular power spectrum C_ℓ^κκ of the convergence (dimensionless, per steradian).

    Args:
        ell: multipoles (>= 0); non-integer values are fine (flat-sky use).
        cosmology: dict, see module docstring.
        z_source: source plane(s) or n(z) bin(s), see module docstring.
        nonlinear: halofit non-linear P(k) (default) or linear.
        l_limber: use pyccl's non-Limber (FKEM) integration below this multipole; -1 = Limber everywhere.
        n_samples: radial samples of the lensing kernel.

    Returns:
        float64 ``[n_ell]`` for one source bin, ``[C, C, n_ell]`` (auto and cross spectra) for several.
    """
    import pyccl as ccl

    ell_arr = np.atleast_1d(np.asarray(ell, dtype=float))
    if ell_arr.ndim != 1 or not np.isfinite(ell_arr).all() or np.any(ell_arr < 0):
        raise ValueError("ell must be a finite, non-negative 1-d array of multipoles")
    sources = parse_sources(z_source)
    cosmo = ccl_cosmology(cosmology, nonlinear)
    tracers = [kappa_tracer(cosmo, s, n_samples) for s in sources]
    C = len(tracers)
    out = np.zeros((C, C, ell_arr.size))
    pos = ell_arr > 0  # the κ prefactor ℓ(ℓ+1) vanishes at ℓ = 0
    for i in range(C):
        for j in range(i, C):
            if pos.any():
                out[i, j, pos] = ccl.angular_cl(cosmo, tracers[i], tracers[j], ell_arr[pos], l_limber=l_limber)
            out[j, i] = out[i, j]
    return out[0, 0] if C == 1 else out


def hilbert2011_shift(z_source: Any) -> np.ndarray:
    """Lognormal shift λ (so that κ >= -λ) per source bin, Hilbert, Hartlap & Schneider 2011 (A&A 536, A85).

    Their fit to the Millennium simulation's empty-beam convergence,
    λ(z) = z (0.008 + 0.029 z - 0.0079 z² + 0.00065 z³). The empty-beam convergence is linear in the
    source distribution, so an n(z) bin gets the n(z)-weighted mean of λ(z).
    """

    def lam(z: np.ndarray | float) -> np.ndarray | float:
        return z * (8e-3 + z * (2.9e-2 + z * (-7.9e-3 + z * 6.5e-4)))

    out = []
    for s in parse_sources(z_source):
        if isinstance(s, float):
            out.append(float(lam(s)))
        else:
            z, nz = s
            out.append(float(np.trapezoid(nz * lam(z), z) / np.trapezoid(nz, z)))
    return np.asarray(out)
