"""Tolerances of the comparison: the pass/fail thresholds and the multiple-testing allowance.

:class:`Tolerances` gates :func:`lensflow.compare.compare`, :class:`MemorizationTolerances` gates
:func:`lensflow.compare.memorization_check`; the reasoning behind each default is in the package
docstring. Both are library knobs: their defaults live in these fields, which ``python -m lensflow.validate``
composes too (:data:`lensflow.validation.config.DEFAULTS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from scipy import stats as sps

from lensflow._util.checks import check_choice, check_int, check_number

__all__ = [
    "CHECK_TARGETS",
    "MULTIPLE_TESTING",
    "POPULATED_SE",
    "MemorizationTolerances",
    "Tolerances",
    "family_alpha",
    "per_bin_sigma",
]

#: Corrections of per-bin thresholds for the number of tests in a family.
MULTIPLE_TESTING = ("sidak", "bonferroni", "none")
#: The accuracy asked of the mean per bin (fractional) by training's sample check, per statistic: the issue's
#: targets, as pipelines/conditional.py measures them.
CHECK_TARGETS: dict[str, float] = {"cl": 0.03, "peaks": 0.05, "pdf": 0.05}
#: A bin is well populated when its fractional standard error is at most this part of its statistic's target.
POPULATED_SE = 0.5

_T = TypeVar("_T")


def _from_config(cls: type[_T], m: Mapping[str, Any] | _T | None, what: str) -> _T:
    """``cls`` from a dict/DictConfig of its fields (``None``: the defaults), unknown keys named in one line."""
    if m is None:
        return cls()
    if isinstance(m, cls):
        return m
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(m) - known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**dict(m))


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail tolerances of :func:`lensflow.compare.compare` (the package docstring gives the reasoning).

    Attributes:
        mean_rtol: accepted fractional error of the mean per bin (0.02 = 2 %).
        mean_sigma: accepted mean difference in standard errors for one bin (3).
        std_rtol: accepted fractional error of the standard deviation per bin (0.05).
        std_sigma: noise allowance of the std ratio in standard errors (``None``: the literal 5 %).
        corr_rms: accepted rms error of the off-diagonal correlation coefficients (0.05).
        corr_sigma: significance (in Gaussian σ, one-sided) of the noise allowance added to ``corr_rms``;
            ``None`` compares with ``corr_rms`` alone.
        multiple_testing: ``"sidak"``, ``"bonferroni"`` or ``"none"`` correction of per-bin thresholds for
            the number of tests in a family.
        family: ``"report"``: the family is every bin of every statistic compared together, so the whole
            verdict keeps the false-alarm rate of one ``mean_sigma`` test per criterion; ``"statistic"``:
            each statistic on its own (more sensitive, but with ~15 statistics the report fails
            independent draws of one distribution ~10 % of the time).
        chi2_pvalue: if set, a statistic also fails when the Hotelling/Hartlap p-value is below it.
        moments_sigma: if set, a statistic also fails when a skewness or kurtosis |t| exceeds it (after
            the multiple-testing correction).
        permutations: relabellings of the pooled maps that calibrate the family-wise thresholds of the mean and
            spread criteria and the omnibus test (:mod:`lensflow.compare.permutation`), exact for any sample
            sizes; ``None`` uses the analytic ``multiple_testing`` thresholds (calibrated only when every bin is
            near-Gaussian and the sets are large).
        omnibus_sigma: the energy-distance test of the joint summary vector fails below the p-value 2Φ(−σ)
            (one more family, one-sided like the test); ``None`` reports it without gating.
        omnibus_max_maps: maps per set entering the omnibus test (random subsets above it).
    """

    mean_rtol: float = 0.02  # mean within max(2 %, mean_sigma standard errors) per bin
    mean_sigma: float = 3.0
    std_rtol: float = 0.05  # std within 5 %, or within std_sigma standard errors of the ratio
    std_sigma: float | None = 3.0  # null: the literal 5 %
    corr_rms: float = 0.05  # rms correlation error <= sqrt(corr_rms^2 + noise quantile^2)
    corr_sigma: float | None = 3.0  # null: corr_rms alone
    multiple_testing: str = "sidak"  # sidak | bonferroni | none: per-bin thresholds for many bins
    family: str = "report"  # report: all bins of all statistics are one family | statistic: each on its own
    chi2_pvalue: float | None = None  # e.g. 1e-3 to also fail on the Hotelling/Hartlap chi2 p-value
    moments_sigma: float | None = None  # e.g. 3.0 to also fail on skewness/kurtosis t-statistics
    # label permutations calibrating the mean/spread thresholds and the omnibus test (exact false-alarm rate for
    # any sizes); null = the analytic multiple_testing thresholds
    permutations: int | None = 1000
    # energy-distance test of the joint summary vector fails at p < 2 Phi(-3); null = report only
    omnibus_sigma: float | None = 3.0
    omnibus_max_maps: int = 2000  # maps per set entering the omnibus test

    def __post_init__(self) -> None:
        if self.permutations is not None:
            check_int("tolerances.permutations", self.permutations, minimum=1)
        check_int("tolerances.omnibus_max_maps", self.omnibus_max_maps, minimum=10)
        check_number("tolerances.omnibus_sigma", self.omnibus_sigma, minimum=0, strict_min=True, allow_none=True)
        for name in ("mean_rtol", "mean_sigma", "std_rtol", "corr_rms"):
            check_number(f"tolerances.{name}", getattr(self, name), minimum=0)
        for name in ("std_sigma", "corr_sigma", "moments_sigma"):
            check_number(f"tolerances.{name}", getattr(self, name), minimum=0, strict_min=True, allow_none=True)
        if self.chi2_pvalue is not None and not (0 < self.chi2_pvalue < 1):
            raise ValueError(f"tolerances.chi2_pvalue must lie in (0, 1) or be null, got {self.chi2_pvalue!r}")
        check_choice("tolerances.family", self.family, ("report", "statistic"))
        check_choice("tolerances.multiple_testing", self.multiple_testing, MULTIPLE_TESTING)

    @property
    def alpha(self) -> float:
        """The family-wise false-alarm level of one criterion: 2Φ(−mean_sigma) (0.27 % at 3σ)."""
        return float(2.0 * sps.norm.sf(self.mean_sigma))

    @classmethod
    def from_config(cls, m: Mapping[str, Any] | Tolerances | None) -> Tolerances:
        """Build from a dict/DictConfig, rejecting unknown keys with one line naming them."""
        return _from_config(cls, m, "tolerances")


@dataclass(frozen=True)
class MemorizationTolerances:
    """Thresholds of :func:`lensflow.compare.memorization_check`.

    Attributes:
        near_factor: a candidate is a near copy when its nearest-neighbour distance to the training set
            is below ``near_factor`` × the median nearest-neighbour distance of held-out maps.
        max_near_fraction: fail when more than this fraction of candidates are near copies.
        pvalue: significance of the one-sided Mann–Whitney test (candidates closer than held-out maps).
        median_ratio: ...which fails only together with a median distance ratio below this (effect size).
    """

    near_factor: float = 0.5  # near copy: distance < near_factor x median held-out distance
    max_near_fraction: float = 0.01
    pvalue: float = 1e-3  # one-sided Mann-Whitney (candidates closer) ...
    median_ratio: float = 0.8  # ... together with a median distance ratio below this

    def __post_init__(self) -> None:
        for name in ("near_factor", "max_near_fraction", "pvalue", "median_ratio"):
            check_number(f"memorization.{name}", getattr(self, name), minimum=0)
        if not 0 < self.pvalue < 1:
            raise ValueError(f"memorization.pvalue must lie in (0, 1), got {self.pvalue!r}")

    @classmethod
    def from_config(cls, m: Mapping[str, Any] | MemorizationTolerances | None) -> MemorizationTolerances:
        """Build from a dict/DictConfig, rejecting unknown keys with one line naming them."""
        return _from_config(cls, m, "memorization")


def per_bin_sigma(sigma: float, n_bins: int, method: str = "sidak") -> float:
    """Per-bin two-sided threshold (in σ) keeping the family-wise false-alarm rate of one ``sigma`` test.

    ``sidak``: 1 − (1 − α_F)^n = α₁; ``bonferroni``: α_F = α₁/n; ``none``: ``sigma`` itself.
    """
    check_choice("multiple_testing", method, MULTIPLE_TESTING)
    if n_bins <= 1 or method == "none":
        return float(sigma)
    return float(sps.norm.isf(family_alpha(2.0 * sps.norm.sf(sigma), n_bins, method) / 2.0))


def family_alpha(alpha: float, n: int, method: str) -> float:
    """Per-test false-alarm rate giving a family of ``n`` tests the rate ``alpha``."""
    if n <= 1 or method == "none":
        return alpha
    return -math.expm1(math.log1p(-alpha) / n) if method == "sidak" else alpha / n
