"""The verdict: per-bin deviations of one statistic, one gating helper per criterion, and the report rows.

A criterion is a function of the two measured sets (:class:`Pair`) returning a :class:`Criterion`: its
verdict (``None`` when it does not gate), the fields it adds to the statistic's result, and a failure
line. :data:`CRITERIA` lists them in report order; a new gate is one more function in that tuple.
:func:`standardized_deviations` gives the per-bin z statistics alone, cheap enough to recompute under
permutations of the set labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from lensflow.compare.metrics import (
    Moments,
    as_rows,
    brown_forsythe_z,
    chi2_of,
    correlation_of,
    moment_tstats_of,
)
from lensflow.compare.tolerances import Tolerances, family_alpha, per_bin_sigma

__all__ = [
    "CRITERIA",
    "Criterion",
    "Pair",
    "compare_statistic",
    "mean_deviation",
    "standardized_deviations",
    "summary_rows",
]


@dataclass
class Pair:
    """One statistic of both sets, measured once: rows [N, F], moments, tolerances and the test family.

    ``family_bins``/``family_statistics`` size the multiple-testing family this statistic belongs to.
    """

    name: str
    shape: tuple[int, ...]
    r: np.ndarray
    c: np.ndarray
    mr: Moments
    mc: Moments
    tol: Tolerances
    family_bins: int
    family_statistics: int
    calibrated: Mapping[str, Any] | None = None  # permutation thresholds and pooled z (see permutation.py)
    groups: tuple[np.ndarray | None, np.ndarray | None] = (None, None)  # group ids of each set's maps (clusters.py)

    @property
    def n_bins(self) -> int:
        return self.r.shape[1]


@dataclass
class Criterion:
    """One criterion's outcome: ``ok`` (``None``: reported, not gating), result fields, failure line."""

    ok: bool | None
    fields: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


# ---------------------------------------------------------------------------------------------------
# Per-bin deviations
# ---------------------------------------------------------------------------------------------------


def mean_deviation(mr: Moments, mc: Moments) -> dict[str, np.ndarray]:
    """Per bin: the mean difference ``d``, its standard error ``se``, ``frac`` = d/|μ_r| and ``z`` = d/SE.

    Where a bin does not vary (SE = 0), ``z`` is 0 for equal means and ±inf otherwise; likewise ``frac``
    where μ_r = 0.
    """
    d = mc.mean - mr.mean
    se = np.sqrt(mr.std**2 / mr.n + mc.std**2 / mc.n)
    varies = se > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(mr.mean != 0, d / np.abs(mr.mean), np.where(d == 0, 0.0, np.inf * np.sign(d)))
        z = np.where(varies, d / np.where(varies, se, 1.0), np.where(d == 0, 0.0, np.inf * np.sign(d)))
    return {"d": d, "se": se, "frac": frac, "z": z}


def standardized_deviations(reference: Any, candidate: Any) -> dict[str, np.ndarray]:
    """Per-bin standardised deviations of one statistic, ``reference`` [N_r, ...] vs ``candidate`` [N_c, ...].

    ``z_mean`` (mean difference over its standard error) and ``std_z_bf`` (Brown–Forsythe z of the
    spreads), flattened over the bins: the numbers the mean and std criteria threshold, as a function of
    the two arrays alone, so their null distribution can be drawn by permuting the set labels.
    """
    r, shape = as_rows("statistic", reference, "reference")
    c, shape_c = as_rows("statistic", candidate, "candidate")
    if shape != shape_c:
        raise ValueError(f"reference bins {shape} differ from candidate bins {shape_c}")
    return {"z_mean": mean_deviation(Moments.of(r), Moments.of(c))["z"], "std_z_bf": brown_forsythe_z(r, c)}


# ---------------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------------


def _mean_criterion(p: Pair) -> Criterion:
    """Mean per bin within max(mean_rtol·|μ_r|, z*·SE).

    With permutations (default) z* is the family's permutation threshold and SE the pooled-scale standard error
    (finite wherever either set varies); otherwise z* is the analytic ``multiple_testing`` threshold and SE Welch's.
    """
    tol = p.tol
    dev = mean_deviation(p.mr, p.mc)
    fields: dict[str, Any] = {"frac_error_mean": dev["frac"], "z_mean": dev["z"], "se_mean": dev["se"]}
    if p.calibrated is not None:
        zf, se, z = float(p.calibrated["t_mean"]), p.calibrated["se_pooled"], p.calibrated["z_mean"]
        fields["z_mean_pooled"] = z
    else:
        zf, se, z = per_bin_sigma(tol.mean_sigma, p.family_bins, tol.multiple_testing), dev["se"], dev["z"]
    allow = np.maximum(tol.mean_rtol * np.abs(p.mr.mean), zf * se)
    ok = np.abs(dev["d"]) <= allow
    fields.update({"mean_sigma_per_bin": zf, "mean_allowed": allow, "mean_pass_bins": ok})
    failure = None
    if not ok.all():
        bad = np.flatnonzero(~ok)
        worst = bad[np.argmax(np.abs(z[bad]))]
        frac = dev["frac"][worst]
        off = _fmt_pct(frac) if np.isfinite(frac) else f"{dev['d'][worst]:+.3g} (reference mean 0)"
        failure = (
            f"mean: {bad.size}/{p.n_bins} bins outside max({tol.mean_rtol:.0%}, {zf:.2f} SE); worst bin "
            f"{_bin_label(worst, p.shape)} off by {off} ({_fmt(z[worst])} SE)"
        )
    return Criterion(bool(ok.all()), fields, failure)


def _std_criterion(p: Pair) -> Criterion:
    """Std ratio within std_rtol, or spreads not significantly different (Brown–Forsythe |z| ≤ z_F).

    The delta-method log standard error of the ratio is reported, not used (see the package docstring).
    """
    tol, mr, mc = p.tol, p.mr, p.mc
    both0 = ~mr.live & ~mc.live
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(both0, 1.0, mc.std / mr.std)
        se_log = np.sqrt(
            np.where(mr.live, (mr.beta2 - 1) / (4 * mr.n), np.nan)
            + np.where(mc.live, (mc.beta2 - 1) / (4 * mc.n), np.nan)
        )
    z_bf = brown_forsythe_z(p.r, p.c)
    ok = both0 | (np.abs(ratio - 1) <= tol.std_rtol)
    fields = {"std_ratio": ratio, "std_se_log": se_log, "std_z_bf": z_bf}
    if tol.std_sigma is not None and p.calibrated is not None:
        # spread z on absolute deviations from the pooled median, against the family's permutation threshold
        ok |= np.abs(p.calibrated["z_spread"]) <= float(p.calibrated["t_spread"])
        fields.update({"std_z_spread": p.calibrated["z_spread"], "std_sigma_per_bin": float(p.calibrated["t_spread"])})
    elif tol.std_sigma is not None:
        ok |= np.abs(z_bf) <= per_bin_sigma(tol.std_sigma, p.family_bins, tol.multiple_testing)
    fields["std_pass_bins"] = ok
    failure = None
    if not ok.all():
        bad = np.flatnonzero(~ok)
        worst = bad[np.argmax(np.abs(np.log(np.where(ratio[bad] > 0, ratio[bad], 1e-300))))]
        failure = (
            f"std: {bad.size}/{p.n_bins} bins with std ratio outside tolerance; worst bin "
            f"{_bin_label(worst, p.shape)} ratio {ratio[worst]:.3f}"
        )
    return Criterion(bool(ok.all()), fields, failure)


def _corr_criterion(p: Pair) -> Criterion:
    """Off-diagonal rms correlation error² ≤ corr_rms² + the noise-only quantile² (family-corrected)."""
    tol = p.tol
    alpha = None
    if tol.corr_sigma is not None:
        alpha = family_alpha(float(sps.norm.sf(tol.corr_sigma)), p.family_statistics, tol.multiple_testing)
    corr = correlation_of(p.mr, p.mc, alpha, p.groups)
    allow = tol.corr_rms
    if tol.corr_sigma is not None and corr["noise_quantile"] is not None:
        allow = math.sqrt(tol.corr_rms**2 + corr["noise_quantile"] ** 2)
    corr["tolerance"] = allow
    ok = corr["rms"] is None or corr["rms"] <= allow
    failure = None
    if not ok:
        failure = (
            f"corr: off-diagonal rms error {corr['rms']:.3f} > {allow:.3f} "
            f"(tolerance {tol.corr_rms} with noise floor {corr['noise_floor']:.3f})"
        )
    return Criterion(ok, {"corr": corr}, failure)


def _chi2_criterion(p: Pair) -> Criterion:
    """Hotelling/Hartlap p-value ≥ chi2_pvalue; reported always, gating only when chi2_pvalue is set."""
    chi2 = chi2_of(p.mr, p.mc)
    if p.tol.chi2_pvalue is None:
        return Criterion(None, {"chi2": chi2})
    pv = chi2["pvalue_hotelling"]
    ok = pv is None or pv >= p.tol.chi2_pvalue
    failure = None if ok else f"chi2: {chi2['chi2']:.1f} for {chi2['dof']} dof, p = {pv:.2e} < {p.tol.chi2_pvalue}"
    return Criterion(ok, {"chi2": chi2}, failure)


def _moments_criterion(p: Pair) -> Criterion:
    """Skewness/kurtosis |t| ≤ z_F; reported always, gating only when moments_sigma is set."""
    mom = moment_tstats_of(p.mr, p.mc)
    fields = {"skewness": mom["skewness"], "kurtosis": mom["kurtosis"]}
    if p.tol.moments_sigma is None:
        return Criterion(None, fields)
    zm = per_bin_sigma(p.tol.moments_sigma, p.family_bins, p.tol.multiple_testing)
    tmax = max(_nanmax_abs(mom["skewness"]["t"]), _nanmax_abs(mom["kurtosis"]["t"]))
    ok = bool(tmax <= zm)
    return Criterion(ok, fields, None if ok else f"moments: skewness/kurtosis |t| up to {tmax:.1f} > {zm:.2f}")


#: The criteria in report order: (verdict key, helper). A new gate is one more entry.
CRITERIA: tuple[tuple[str, Callable[[Pair], Criterion]], ...] = (
    ("mean", _mean_criterion),
    ("std", _std_criterion),
    ("corr", _corr_criterion),
    ("chi2", _chi2_criterion),
    ("moments", _moments_criterion),
)


# ---------------------------------------------------------------------------------------------------
# One statistic, all statistics
# ---------------------------------------------------------------------------------------------------


def compare_statistic(
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerances: Tolerances | Mapping[str, Any] | None = None,
    name: str = "statistic",
    family: tuple[int, int] | None = None,
    calibrated: Mapping[str, Any] | None = None,
    groups: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> dict[str, Any]:
    """Every metric and the verdict for one statistic: ``reference`` [N_r, ...], ``candidate`` [N_c, ...].

    ``family`` = (bins, statistics) of the multiple-testing family this statistic belongs to
    (:func:`compare` passes the totals when ``tolerances.family == "report"``); default: this statistic.
    ``calibrated`` carries the permutation thresholds of the family (``t_mean``, ``t_spread``) and this
    statistic's pooled z and SE (:func:`lensflow.compare.permutation.permutation_thresholds`); :func:`compare`
    computes it when ``tolerances.permutations`` is set. ``groups`` are the group ids of each set's maps (maps
    cut from one box; ``None``: independent maps), which the correlation noise floor sums over. Arrays in the
    result are flattened over the trailing axes (``shape`` gives them back).
    """
    tol = Tolerances.from_config(tolerances)
    r, shape = as_rows(name, reference, "reference")
    c, shape_c = as_rows(name, candidate, "candidate")
    if shape != shape_c:
        raise ValueError(f"statistic {name!r}: reference bins {shape} differ from candidate bins {shape_c}")
    mr, mc = Moments.of(r), Moments.of(c)
    n_live = int(np.sum(np.sqrt(mr.std**2 / mr.n + mc.std**2 / mc.n) > 0))
    n_fam, n_stat = family if family is not None else (n_live, 1)
    pair = Pair(name, shape, r, c, mr, mc, tol, max(n_fam, n_live), n_stat, calibrated, groups)
    out: dict[str, Any] = {
        "shape": list(shape),
        "n_bins": pair.n_bins,
        "n_varying": n_live,
        "family_bins": pair.family_bins,
        "n_reference": mr.n,
        "n_candidate": mc.n,
        "mean_reference": mr.mean,
        "mean_candidate": mc.mean,
        "std_reference": mr.std,
        "std_candidate": mc.std,
    }
    verdict: dict[str, bool | None] = {}
    failures: list[str] = []
    for key, criterion in CRITERIA:
        res = criterion(pair)
        out.update(res.fields)
        verdict[key] = res.ok
        if res.failure:
            failures.append(res.failure)
    verdict["pass"] = all(v for v in verdict.values() if v is not None)
    out["verdict"] = verdict
    out["failures"] = failures
    return out


# ---------------------------------------------------------------------------------------------------
# Report rows
# ---------------------------------------------------------------------------------------------------


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per statistic of a :func:`compare` result: the headline numbers and the verdicts.

    ``max_abs_frac_error`` is taken over the bins whose reference mean is measured to better than a
    third of itself (|μ_r| > 3 σ_r/sqrt(N_r)): elsewhere (sparse peak bins, PDF tails, zero crossings of
    V2) a fractional error is noise over noise. ``std_ratio_min/max`` span the bins that vary in both sets.
    Works on the numpy form of a result and on its JSON form (``None`` for non-finite numbers).
    """
    rows = []
    for name, r in result["statistics"].items():
        live = _floats(r["se_mean"]) > 0
        mr, sr, sc = _floats(r["mean_reference"]), _floats(r["std_reference"]), _floats(r["std_candidate"])
        measured = np.abs(mr) > 3 * sr / math.sqrt(r["n_reference"])
        ratio = _floats(r["std_ratio"])
        both = (sr > 0) & (sc > 0)
        chi2, corr = r["chi2"], r["corr"]
        rows.append(
            {
                "statistic": name,
                "bins": r["n_bins"],
                "max_abs_frac_error": _nanmax_abs(_floats(r["frac_error_mean"])[measured]),
                # the z that the threshold applies to: pooled-scale or clustered when calibrated, else Welch's
                "max_abs_z": _nanmax_abs(_floats(r.get("z_mean_pooled", r["z_mean"]))[live]),
                "z_allowed": r["mean_sigma_per_bin"],
                "std_ratio_min": float(np.min(ratio[both])) if both.any() else 1.0,
                "std_ratio_max": float(np.max(ratio[both])) if both.any() else 1.0,
                "chi2": chi2["chi2"],
                "dof": chi2["dof"],
                "pvalue": chi2["pvalue_hotelling"],
                "corr_rms": corr["rms"],
                "corr_noise_floor": corr["noise_floor"],
                "corr_tolerance": corr.get("tolerance"),
                "max_abs_t_skew": _nanmax_abs(_floats(r["skewness"]["t"])),
                "max_abs_t_kurt": _nanmax_abs(_floats(r["kurtosis"]["t"])),
                **{f"pass_{k}": v for k, v in r["verdict"].items()},
            }
        )
    return rows


def _floats(x: Any) -> np.ndarray:
    """Float array from numpy or JSON (``None`` for non-finite) form."""
    return np.array([np.nan if v is None else v for v in np.ravel(np.asarray(x, dtype=object))], dtype=float)


def _nanmax_abs(a: np.ndarray) -> float:
    a = np.abs(np.asarray(a, dtype=float))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _fmt(x: float) -> str:
    return f"{x:+.1f}" if np.isfinite(x) else str(x)


def _fmt_pct(x: float) -> str:
    return f"{x:+.1%}" if np.isfinite(x) else str(x)


def _bin_label(i: int, shape: tuple[int, ...]) -> str:
    return str(tuple(int(k) for k in np.unravel_index(int(i), shape))) if len(shape) > 1 else str(int(i))
