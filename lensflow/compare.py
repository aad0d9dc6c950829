"""Compare the statistics of two sets of κ maps (a reference, e.g. held-out simulations, and a candidate,
e.g. emulator mocks), bin by bin, and decide whether they agree.

Everything here works on plain arrays: a statistic is an array ``[N, ...]`` with one row per map (as
returned by :func:`lensflow.stats.summarize`); the trailing axes are flattened into ``F`` bins.

Metrics per statistic and bin
-----------------------------
- ``frac_error_mean`` = (μ_c − μ_r)/|μ_r|, the fractional error of the mean;
- ``std_ratio`` = σ_c/σ_r (sample standard deviations, ddof = 1);
- ``z_mean`` = (μ_c − μ_r)/SE with SE = sqrt(σ_r²/N_r + σ_c²/N_c), the mean difference in units of its
  standard error;
- ``chi2``: χ² of the mean difference d against the reference covariance S_r scaled to the covariance
  of a difference of two means, S_r (1/N_r + 1/N_c), with the Hartlap et al. (2007) factor
  h = (N_r − p − 2)/(N_r − 1) on the inverse: χ² = h dᵀ S_r⁻¹ d / (1/N_r + 1/N_c), p-value from χ²_p.
  Because the mean difference is independent of S_r for Gaussian data, T² = χ²/h is exactly Hotelling's
  T², and ``pvalue_hotelling`` from F(p, N_r − p) is the finite-sample-exact p-value (Sellentin & Heavens
  2016 give the same conclusion: the Hartlap χ² tail is too light when p/N_r is not small).
  Bins without reference variance are left out, and the inverse is taken in the eigenbasis of the
  reference correlation matrix, dropping numerically null modes (relative eigenvalue < ``1e-10``, e.g.
  the normalisation constraint of a PDF), so p is the rank actually used. When p ≥ N_r − 2 the
  Hartlap factor is ≤ 0 and the χ² is reported as not computable (``chi2 = None`` with a ``note``);
  ``chi2_diag`` = Σ z_mean² is always given (no p-value: bins are correlated).
- ``corr``: the error of the correlation matrix, max and rms over the off-diagonal elements of
  R_c − R_r, beside the finite-sample noise floor: the rms that two independent draws of the *same*
  distribution would show. The floor is computed from the delta-method (influence-function) variance of
  sample correlation coefficients, which is exact asymptotically for any distribution with finite
  fourth moments and reduces to (1 − ρ²)²/N for Gaussian data; it is evaluated through an N×N Gram
  matrix, so it costs O(N²F + NF²) and never forms the F² pair space.
- ``skewness`` / ``kurtosis``: per-bin sample skewness G1 and excess kurtosis G2 of each set's
  distribution of the statistic, and their t-statistic (difference over its standard error, the SE from
  the influence function of each estimator; 6/N and 24/N for Gaussian data, larger for heavy tails).

Verdict and why the tolerances look the way they do
--------------------------------------------------------------------
The defaults (:class:`Tolerances`) follow the issue: mean within max(2 %, 3 standard errors), standard
deviation within 5 %, correlation rms error ≤ 0.05. Read literally, the last two would fail two
independent draws of the same distribution at the sample sizes a validation uses: with N = 300 maps per
set the standard error of a ratio of standard deviations is ≈ sqrt(1/(2N) · 2) ≈ 6 % for Gaussian
statistics, and the rms of off-diagonal correlation differences is ≈ sqrt(2/N) ≈ 8 %. So each tolerance
is a *floor on the accepted error*, widened by the sampling noise of the comparison:

- mean, per bin: |μ_c − μ_r| ≤ max(``mean_rtol``·|μ_r|, z_F·SE), z_F the multiple-testing threshold below;
- std, per bin: |σ_c/σ_r − 1| ≤ ``std_rtol`` or the spreads are not significantly different,
  |z_BF| ≤ z_F, with z_BF the Brown–Forsythe statistic (Welch z of the mean absolute deviation from the
  median). The delta-method error of ln(σ_c/σ_r), SE_ln² = Σ_sets (β₂ − 1)/(4N), is reported too, but
  it does not decide: per-map statistics of κ maps are often sparse and heavy-tailed (rare high peaks,
  PDF tails), where the sample kurtosis underestimates the tails and a bin in which one set has a single
  non-zero value gives a ratio of 0 or ∞. On 30 pairs of independent lognormal simulation sets (250
  maps of 64² per set, 15 statistics, default thresholds) the ln-ratio rule failed the std criterion in
  4 pairs, the Brown–Forsythe rule in none;
- correlation: rms² ≤ ``corr_rms``² + q, where q is the (1 − α) quantile of the noise-only rms², from
  a Satterthwaite (scaled χ²) fit to the first two moments of the quadratic form (α from
  ``corr_sigma``, one-sided: 3 → 0.13 %, shared over the statistics of the family).

Multiple testing: the verdict fails if *any* bin fails, so a per-bin 3σ threshold fails a 40-bin
statistic from noise alone with probability ≈ 10 %, and a report of 15 statistics × ~18 bins most of the
time. ``multiple_testing="sidak"`` (default) raises the per-bin threshold to z_F with
1 − (1 − α_F)^F = α₁, α₁ = 2Φ(−``mean_sigma``) = 0.27 %, F the number of bins in the family, so the
family keeps the false-alarm rate of a single 3σ test per criterion. ``family="report"`` (default) makes
the family every bin of every statistic compared together (z_F ≈ 4.6 for 270 bins): the exit code of a
validation is one decision, and it should fail two independent draws of one distribution ~0.3 % of the
time per criterion, not ~10 %. Measured on the 30 simulation pairs above: 0 of 30 fail with
``family="report"``, 3 of 30 with ``family="statistic"`` (per-statistic thresholds, z_F ≈ 3.8 for 20
bins: more sensitive to a problem confined to one statistic). The cost of the wider threshold is small
where it matters: wherever 2 % exceeds z_F·SE, the 2 % floor decides. ``"bonferroni"`` is slightly more
conservative than Šidák, ``"none"`` is the literal per-bin 3σ. Bins without variance in either set (e.g.
empty peak bins at high ν) do not count towards F and pass only if their means agree.

χ² and skewness/kurtosis t-statistics are always reported; they gate the verdict only when
``chi2_pvalue`` / ``moments_sigma`` are set, because with many maps they detect differences far below
the 2 % the mean tolerance deliberately accepts.

Memorisation (pixel level)
--------------------------
:func:`memorization_check` compares nearest-neighbour L2 distances of candidate maps to the training
maps with those of held-out reference maps to the same training maps. Independent maps sit at a
well-defined typical distance from the training set; a copied (or nearly copied) training map sits
near zero. It fails when more than ``max_near_fraction`` of the candidates lie closer than
``near_factor`` × median(held-out distance), or when candidates are significantly (one-sided
Mann–Whitney, p < ``pvalue``) *and* substantially (median ratio < ``median_ratio``) closer than held-out
maps are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

__all__ = [
    "Tolerances",
    "MemorizationTolerances",
    "compare",
    "compare_statistic",
    "hartlap_chi2",
    "brown_forsythe_z",
    "correlation_error",
    "moment_tstats",
    "per_bin_sigma",
    "nearest_neighbour_distances",
    "memorization_check",
    "summary_rows",
    "format_table",
    "to_jsonable",
]

_MT_METHODS = ("sidak", "bonferroni", "none")
_RCOND = 1e-10
# Rows used to estimate the sampling noise of correlation matrices: the floor is an average over many
# pairs, so a few thousand maps pin it down; this caps the N×N Gram matrix at (2·2000)² doubles.
_MAX_NOISE_ROWS = 2000


# ---------------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail tolerances of :func:`compare` (see the module docstring for the reasoning).

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
    """

    mean_rtol: float = 0.02
    mean_sigma: float = 3.0
    std_rtol: float = 0.05
    std_sigma: float | None = 3.0
    corr_rms: float = 0.05
    corr_sigma: float | None = 3.0
    multiple_testing: str = "sidak"
    family: str = "report"
    chi2_pvalue: float | None = None
    moments_sigma: float | None = None

    def __post_init__(self) -> None:
        for name in ("mean_rtol", "mean_sigma", "std_rtol", "corr_rms"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"tolerances.{name} must be a non-negative number, got {v!r}")
        for name in ("std_sigma", "corr_sigma", "moments_sigma"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"tolerances.{name} must be a positive number or null, got {v!r}")
        if self.chi2_pvalue is not None and not (0 < self.chi2_pvalue < 1):
            raise ValueError(f"tolerances.chi2_pvalue must lie in (0, 1) or be null, got {self.chi2_pvalue!r}")
        if self.family not in ("report", "statistic"):
            raise ValueError(f"tolerances.family must be 'report' or 'statistic', got {self.family!r}")
        if self.multiple_testing not in _MT_METHODS:
            raise ValueError(f"tolerances.multiple_testing must be one of {_MT_METHODS}, got {self.multiple_testing!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | Tolerances | None) -> Tolerances:
        """Build from a dict/DictConfig, rejecting unknown keys with one line naming them."""
        if m is None:
            return cls()
        if isinstance(m, cls):
            return m
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"tolerances: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(m))


@dataclass(frozen=True)
class MemorizationTolerances:
    """Thresholds of :func:`memorization_check`.

    Attributes:
        near_factor: a candidate is a near copy when its nearest-neighbour distance to the training set
            is below ``near_factor`` × the median nearest-neighbour distance of held-out maps.
        max_near_fraction: fail when more than this fraction of candidates are near copies.
        pvalue: significance of the one-sided Mann–Whitney test (candidates closer than held-out maps).
        median_ratio: ...which fails only together with a median distance ratio below this (effect size).
    """

    near_factor: float = 0.5
    max_near_fraction: float = 0.01
    pvalue: float = 1e-3
    median_ratio: float = 0.8

    def __post_init__(self) -> None:
        for name in ("near_factor", "max_near_fraction", "pvalue", "median_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"memorization.{name} must be a non-negative number, got {v!r}")
        if not 0 < self.pvalue < 1:
            raise ValueError(f"memorization.pvalue must lie in (0, 1), got {self.pvalue!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | MemorizationTolerances | None) -> MemorizationTolerances:
        if m is None:
            return cls()
        if isinstance(m, cls):
            return m
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"memorization: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(m))


def per_bin_sigma(sigma: float, n_bins: int, method: str = "sidak") -> float:
    """Per-bin two-sided threshold (in σ) keeping the family-wise false-alarm rate of one ``sigma`` test.

    ``sidak``: 1 − (1 − α_F)^n = α₁; ``bonferroni``: α_F = α₁/n; ``none``: ``sigma`` itself.
    """
    if method not in _MT_METHODS:
        raise ValueError(f"multiple_testing must be one of {_MT_METHODS}, got {method!r}")
    if n_bins <= 1 or method == "none":
        return float(sigma)
    return float(sps.norm.isf(_family_alpha(2.0 * sps.norm.sf(sigma), n_bins, method) / 2.0))


def _family_alpha(alpha: float, n: int, method: str) -> float:
    """Per-test false-alarm rate giving a family of ``n`` tests the rate ``alpha``."""
    if n <= 1 or method == "none":
        return alpha
    return -math.expm1(math.log1p(-alpha) / n) if method == "sidak" else alpha / n


# ---------------------------------------------------------------------------------------------------
# Per-set moments
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Moments:
    n: int
    mean: np.ndarray  # [F]
    std: np.ndarray  # [F] ddof=1
    m2: np.ndarray  # [F] biased second central moment
    z: np.ndarray  # [N, F] standardised with the biased m2 (0 where m2 == 0)
    g1: np.ndarray  # [F] biased skewness m3/m2^1.5
    beta2: np.ndarray  # [F] biased kurtosis m4/m2^2 (not excess)
    live: np.ndarray  # [F] bool: m2 > 0


def _moments(x: np.ndarray) -> _Moments:
    n = x.shape[0]
    mean = x.mean(axis=0)
    xc = x - mean
    m2 = (xc * xc).mean(axis=0)
    # Relative threshold: a "constant" bin can carry rounding noise of order eps·|mean|.
    scale = np.maximum(np.abs(mean), np.sqrt(m2))
    live = m2 > (64 * np.finfo(np.float64).eps * scale) ** 2
    safe = np.where(live, m2, 1.0)
    z = np.where(live, xc / np.sqrt(safe), 0.0)
    g1 = np.where(live, (z**3).mean(axis=0), 0.0)
    beta2 = np.where(live, (z**4).mean(axis=0), 0.0)
    std = np.sqrt(np.where(live, m2, 0.0) * n / (n - 1))
    return _Moments(n, mean, std, m2, z, g1, beta2, live)


def _as_2d(name: str, arr: Any, which: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError(f"{which} statistic {name!r} must have one row per map, got a scalar")
    if a.ndim == 1:
        a = a[:, None]
    if a.shape[0] < 4:
        raise ValueError(f"{which} statistic {name!r} has {a.shape[0]} maps; at least 4 are needed")
    if not np.isfinite(a).all():
        raise ValueError(f"{which} statistic {name!r} has NaN or Inf values")
    return a.reshape(a.shape[0], -1), tuple(a.shape[1:])


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def hartlap_chi2(reference: np.ndarray, candidate: np.ndarray, rcond: float = _RCOND) -> dict[str, Any]:
    """Hartlap-corrected χ² of the mean difference of two sets [N, F] against the reference covariance.

    χ² = h · dᵀ S_r⁻¹ d / (1/N_r + 1/N_c), h = (N_r − p − 2)/(N_r − 1), d = mean_c − mean_r, S_r the
    unbiased reference covariance. Bins without reference variance are dropped; S_r is inverted in the
    eigenbasis of the reference correlation matrix keeping modes above ``rcond`` × the largest, so
    ``p`` is the rank used. Returns ``chi2``, ``dof`` (= p), ``pvalue`` (χ²_p), ``pvalue_hotelling``
    (exact F(p, N_r − p) for Gaussian data), ``hartlap``, ``chi2_diag``, ``n_bins_used``, ``note``;
    ``chi2``/``pvalue`` are ``None`` when p ≥ N_r − 2.
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    mr, mc = _moments(r), _moments(c)
    return _hartlap(r, mr, mc, rcond)


def _hartlap(r: np.ndarray, mr: _Moments, mc: _Moments, rcond: float = _RCOND) -> dict[str, Any]:
    nr, nc = mr.n, mc.n
    d = mc.mean - mr.mean
    se2 = mr.std**2 / nr + mc.std**2 / nc
    has = se2 > 0
    diag = float(np.sum(d[has] ** 2 / se2[has]))
    act = mr.live
    out: dict[str, Any] = {
        "chi2": None,
        "dof": 0,
        "pvalue": None,
        "pvalue_hotelling": None,
        "hartlap": None,
        "chi2_diag": diag,
        "n_bins_used": int(act.sum()),
        "note": "",
    }
    if not act.any():
        out["note"] = "no bin has reference variance"
        return out
    y = d[act] / mr.std[act]
    zr = mr.z[:, act]
    corr = (zr.T @ zr) / nr  # reference correlation matrix (biased m2 cancels)
    w, v = np.linalg.eigh(corr)
    keep = w > rcond * w.max()
    p = int(keep.sum())
    out["dof"] = p
    proj = v[:, keep].T @ y
    t2 = float(np.sum(proj**2 / w[keep])) / (1.0 / nr + 1.0 / nc)
    if nr - p - 2 <= 0:
        out["note"] = (
            f"not computable: covariance rank p={p} >= N_ref-2={nr - 2}; use more reference maps "
            "or fewer bins (chi2_diag ignores correlations)"
        )
        return out
    h = (nr - p - 2) / (nr - 1)
    out["hartlap"] = h
    out["chi2"] = h * t2
    out["pvalue"] = float(sps.chi2.sf(h * t2, p))
    out["pvalue_hotelling"] = float(sps.f.sf(t2 * (nr - p) / (p * (nr - 1)), p, nr - p))
    if p < int(act.sum()):
        out["note"] = f"{int(act.sum()) - p} numerically singular mode(s) of the reference covariance dropped"
    return out


def _if_gram(za: np.ndarray, ra: np.ndarray, zb: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Gram matrix G[n, m] = Σ_{i<j} IF^a_n,ij IF^b_m,ij of correlation influence functions.

    IF_n,ij = z_ni z_nj − ρ_ij (z_ni² + z_nj²)/2 vanishes on the diagonal (ρ_ii = 1), so the sum over
    i<j is half the Frobenius product, which expands into O(N²F + NF²) matrix products.
    """
    ua, ub = za**2, zb**2
    wa = za * (za @ rb)  # z_a ∘ (ρ_b z_a)
    wb = zb * (zb @ ra)
    p = ra * rb
    mid = np.diag(p.sum(axis=1)) + p
    g = (za @ zb.T) ** 2 - wa @ ub.T - ua @ wb.T + 0.5 * (ua @ mid @ ub.T)
    return 0.5 * g


def correlation_error(reference: np.ndarray, candidate: np.ndarray, sigma: float | None = 3.0) -> dict[str, Any]:
    """Error of the candidate's correlation matrix against the reference's, with its noise floor.

    Over the off-diagonal pairs of bins that vary in both sets: ``rms`` and ``max`` of R_c − R_r,
    ``noise_floor`` = the rms expected from sampling noise alone (two independent draws of one
    distribution), and ``noise_quantile`` = the one-sided ``sigma`` quantile of that noise rms
    (Satterthwaite scaled-χ² approximation), plus the matrices themselves (over all bins, NaN where a
    bin has no variance).
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    return _corr(_moments(r), _moments(c), None if sigma is None else float(sps.norm.sf(sigma)))


def _corr(mr: _Moments, mc: _Moments, alpha: float | None) -> dict[str, Any]:
    F = mr.mean.shape[0]
    act = mr.live & mc.live
    k = int(act.sum())
    full_r = np.full((F, F), np.nan)
    full_c = np.full((F, F), np.nan)
    out: dict[str, Any] = {
        "rms": None,
        "max": None,
        "noise_floor": None,
        "noise_quantile": None,
        "n_pairs": k * (k - 1) // 2,
        "corr_reference": full_r,
        "corr_candidate": full_c,
    }
    if k < 2:
        return out
    zr, zc = mr.z[:, act], mc.z[:, act]
    rr = (zr.T @ zr) / mr.n
    rc = (zc.T @ zc) / mc.n
    np.fill_diagonal(rr, 1.0)
    np.fill_diagonal(rc, 1.0)
    ix = np.ix_(act, act)
    full_r[ix], full_c[ix] = rr, rc
    iu = np.triu_indices(k, 1)
    delta = (rc - rr)[iu]
    M = delta.size
    out["rms"] = float(np.sqrt(np.mean(delta**2)))
    out["max"] = float(np.max(np.abs(delta)))
    # Sampling covariance of delta = Σ_sets IF_sᵀ IF_s / N_s², estimated from at most _MAX_NOISE_ROWS rows
    # per set (rescaled), through the Gram matrix of the stacked, scaled influence functions.
    sr = _rows(mr.n)
    sc = _rows(mc.n)
    ar = 1.0 / math.sqrt(len(sr) * mr.n)
    ac = 1.0 / math.sqrt(len(sc) * mc.n)
    g_rr = _if_gram(zr[sr], rr, zr[sr], rr) * ar * ar
    g_cc = _if_gram(zc[sc], rc, zc[sc], rc) * ac * ac
    g_rc = _if_gram(zr[sr], rr, zc[sc], rc) * ar * ac
    tr = float(np.trace(g_rr) + np.trace(g_cc))
    tr2 = float(np.sum(g_rr**2) + np.sum(g_cc**2) + 2.0 * np.sum(g_rc**2))
    out["noise_floor"] = math.sqrt(max(tr, 0.0) / M)
    if alpha is not None and tr > 0 and tr2 > 0:
        g, h = tr2 / tr, tr * tr / tr2  # Σδ² ≈ g·χ²_h, matching mean and variance
        out["noise_quantile"] = math.sqrt(g * sps.chi2.isf(alpha, h) / M)
    return out


def _rows(n: int) -> np.ndarray:
    if n <= _MAX_NOISE_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, _MAX_NOISE_ROWS).round().astype(np.int64)


def moment_tstats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-bin skewness and excess kurtosis of each set's distribution [N, F] and their t-statistics.

    Estimators are the bias-adjusted G1 and G2 (as ``scipy.stats.skew/kurtosis(bias=False)``); the
    standard error of each difference sums both sets' influence-function variances
    (IF_skew = z³ − 3z − g₁ − 1.5 g₁(z² − 1), IF_kurt = z⁴ − β₂ − 4g₁z − 2β₂(z² − 1)). NaN where a bin has
    no variance. The SEs rest on sample 6th and 8th moments: exact for Gaussian data (t has unit spread),
    but for skewed distributions at N ~ 300 they run low (spread ~1.2 for a Gamma(3) variable), which is
    why these t-statistics gate the verdict only on request (``Tolerances.moments_sigma``).
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    return _mom_t(_moments(r), _moments(c))


def _g1g2(m: _Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = m.n
    G1 = m.g1 * math.sqrt(n * (n - 1)) / (n - 2)
    G2 = ((n + 1) * (m.beta2 - 3.0) + 6.0) * (n - 1) / ((n - 2) * (n - 3))
    z = m.z
    if_s = z**3 - 3 * z - m.g1 - 1.5 * m.g1 * (z**2 - 1)
    if_k = z**4 - m.beta2 - 4 * m.g1 * z - 2 * m.beta2 * (z**2 - 1)
    vs = (if_s**2).mean(axis=0) / n
    vk = (if_k**2).mean(axis=0) / n
    nan = ~m.live
    return (np.where(nan, np.nan, G1), np.where(nan, np.nan, G2), np.where(nan, np.nan, vs), np.where(nan, np.nan, vk))


def _mom_t(mr: _Moments, mc: _Moments) -> dict[str, dict[str, np.ndarray]]:
    s_r, k_r, vs_r, vk_r = _g1g2(mr)
    s_c, k_c, vs_c, vk_c = _g1g2(mc)
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (s_c - s_r) / np.sqrt(vs_r + vs_c)
        tk = (k_c - k_r) / np.sqrt(vk_r + vk_c)
    return {
        "skewness": {"reference": s_r, "candidate": s_c, "t": ts},
        "kurtosis": {"reference": k_r, "candidate": k_c, "t": tk},
    }


def brown_forsythe_z(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-bin Brown–Forsythe z of a dispersion difference between two sets [N, F].

    Welch's z of the mean absolute deviation from each set's median (candidate minus reference). Unlike
    the F test or the kurtosis-corrected log std ratio, it stays calibrated for the heavy-tailed and
    sparse per-map statistics of κ maps (counts of rare high peaks, PDF tails): a bin where one set
    happens to hold a single non-zero value is no evidence of a different spread. 0 where neither set
    varies, ±inf where only the mean absolute deviations differ without any scatter.
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    dr = np.abs(r - np.median(r, axis=0))
    dc = np.abs(c - np.median(c, axis=0))
    diff = dc.mean(axis=0) - dr.mean(axis=0)
    se = np.sqrt(dr.var(axis=0, ddof=1) / r.shape[0] + dc.var(axis=0, ddof=1) / c.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf * np.sign(diff)))


# ---------------------------------------------------------------------------------------------------
# One statistic, all statistics
# ---------------------------------------------------------------------------------------------------


def compare_statistic(
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerances: Tolerances | Mapping[str, Any] | None = None,
    name: str = "statistic",
    family: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Every metric and the verdict for one statistic: ``reference`` [N_r, ...], ``candidate`` [N_c, ...].

    ``family`` = (bins, statistics) of the multiple-testing family this statistic belongs to
    (:func:`compare` passes the totals when ``tolerances.family == "report"``); default: this statistic.
    Arrays in the result are flattened over the trailing axes (``shape`` gives them back).
    """
    tol = Tolerances.from_mapping(tolerances)
    r, shape = _as_2d(name, reference, "reference")
    c, shape_c = _as_2d(name, candidate, "candidate")
    if shape != shape_c:
        raise ValueError(f"statistic {name!r}: reference bins {shape} differ from candidate bins {shape_c}")
    mr, mc = _moments(r), _moments(c)
    nr, nc = mr.n, mc.n
    F = r.shape[1]

    d = mc.mean - mr.mean
    se = np.sqrt(mr.std**2 / nr + mc.std**2 / nc)
    varies = se > 0
    n_live = int(varies.sum())
    n_fam, n_stat = family if family is not None else (n_live, 1)
    n_fam = max(n_fam, n_live)
    zf = per_bin_sigma(tol.mean_sigma, n_fam, tol.multiple_testing)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(mr.mean != 0, d / np.abs(mr.mean), np.where(d == 0, 0.0, np.inf * np.sign(d)))
        z = np.where(varies, d / np.where(varies, se, 1.0), np.where(d == 0, 0.0, np.inf * np.sign(d)))
    mean_allow = np.maximum(tol.mean_rtol * np.abs(mr.mean), zf * se)
    mean_ok = np.abs(d) <= mean_allow

    # Standard deviations: the ratio, its delta-method log standard error (reported), and the robust
    # Brown-Forsythe z that decides whether a ratio outside std_rtol is more than noise.
    both0 = ~mr.live & ~mc.live
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(both0, 1.0, mc.std / mr.std)
        se_log = np.sqrt(
            np.where(mr.live, (mr.beta2 - 1) / (4 * nr), np.nan) + np.where(mc.live, (mc.beta2 - 1) / (4 * nc), np.nan)
        )
    z_bf = brown_forsythe_z(r, c)
    std_ok = both0 | (np.abs(ratio - 1) <= tol.std_rtol)
    if tol.std_sigma is not None:
        zs = per_bin_sigma(tol.std_sigma, n_fam, tol.multiple_testing)
        std_ok |= np.abs(z_bf) <= zs

    chi2 = _hartlap(r, mr, mc)
    corr = _corr(
        mr,
        mc,
        None
        if tol.corr_sigma is None
        else _family_alpha(float(sps.norm.sf(tol.corr_sigma)), n_stat, tol.multiple_testing),
    )
    mom = _mom_t(mr, mc)

    corr_allow = tol.corr_rms
    if tol.corr_sigma is not None and corr["noise_quantile"] is not None:
        corr_allow = math.sqrt(tol.corr_rms**2 + corr["noise_quantile"] ** 2)
    corr["tolerance"] = corr_allow
    corr_ok = corr["rms"] is None or corr["rms"] <= corr_allow

    failures: list[str] = []
    verdict: dict[str, bool | None] = {
        "mean": bool(mean_ok.all()),
        "std": bool(std_ok.all()),
        "corr": corr_ok,
        "chi2": None,
        "moments": None,
    }
    if not verdict["mean"]:
        bad = np.flatnonzero(~mean_ok)
        worst = bad[np.argmax(np.abs(z[bad]))]
        failures.append(
            f"mean: {bad.size}/{F} bins outside max({tol.mean_rtol:.0%}, {zf:.2f} SE); worst bin "
            f"{_bin_label(worst, shape)} off by {_fmt_pct(frac[worst])} ({_fmt(z[worst])} SE)"
        )
    if not verdict["std"]:
        bad = np.flatnonzero(~std_ok)
        worst = bad[np.argmax(np.abs(np.log(np.where(ratio[bad] > 0, ratio[bad], 1e-300))))]
        failures.append(
            f"std: {bad.size}/{F} bins with std ratio outside tolerance; worst bin "
            f"{_bin_label(worst, shape)} ratio {ratio[worst]:.3f}"
        )
    if not corr_ok:
        failures.append(
            f"corr: off-diagonal rms error {corr['rms']:.3f} > {corr_allow:.3f} "
            f"(tolerance {tol.corr_rms} with noise floor {corr['noise_floor']:.3f})"
        )
    if tol.chi2_pvalue is not None:
        pv = chi2["pvalue_hotelling"]
        verdict["chi2"] = pv is None or pv >= tol.chi2_pvalue
        if not verdict["chi2"]:
            failures.append(f"chi2: {chi2['chi2']:.1f} for {chi2['dof']} dof, p = {pv:.2e} < {tol.chi2_pvalue}")
    if tol.moments_sigma is not None:
        zm = per_bin_sigma(tol.moments_sigma, n_fam, tol.multiple_testing)
        tmax = max(_nanmax_abs(mom["skewness"]["t"]), _nanmax_abs(mom["kurtosis"]["t"]))
        verdict["moments"] = bool(tmax <= zm)
        if not verdict["moments"]:
            failures.append(f"moments: skewness/kurtosis |t| up to {tmax:.1f} > {zm:.2f}")
    verdict["pass"] = all(v for v in verdict.values() if v is not None)

    return {
        "shape": list(shape),
        "n_bins": F,
        "n_varying": n_live,
        "family_bins": n_fam,
        "n_reference": nr,
        "n_candidate": nc,
        "mean_reference": mr.mean,
        "mean_candidate": mc.mean,
        "std_reference": mr.std,
        "std_candidate": mc.std,
        "frac_error_mean": frac,
        "z_mean": z,
        "se_mean": se,
        "mean_sigma_per_bin": zf,
        "mean_allowed": mean_allow,
        "mean_pass_bins": mean_ok,
        "std_ratio": ratio,
        "std_se_log": se_log,
        "std_z_bf": z_bf,
        "std_pass_bins": std_ok,
        "chi2": chi2,
        "corr": corr,
        "skewness": mom["skewness"],
        "kurtosis": mom["kurtosis"],
        "verdict": verdict,
        "failures": failures,
    }


def compare(
    reference: Mapping[str, Any], candidate: Mapping[str, Any], tolerances: Tolerances | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Compare per-map statistics of two sets, statistic by statistic.

    Args:
        reference: {name: array [N_r, ...]} (e.g. from :func:`lensflow.stats.summarize` of simulations).
        candidate: {name: array [N_c, ...]} with the same names and bin shapes.
        tolerances: :class:`Tolerances` or a mapping of its fields (defaults when ``None``).

    Returns:
        ``{"pass": bool, "n_reference", "n_candidate", "tolerances": {...}, "statistics": {name:
        compare_statistic(...)}, "failures": [one line per failed statistic]}``.
    """
    tol = Tolerances.from_mapping(tolerances)
    missing = sorted(set(reference) ^ set(candidate))
    if missing:
        raise ValueError(f"reference and candidate statistics differ: {missing} present in only one set")
    if not reference:
        raise ValueError("no statistics to compare")
    n_bins = 0
    for name in reference:
        r, shape = _as_2d(name, reference[name], "reference")
        c, shape_c = _as_2d(name, candidate[name], "candidate")
        if shape != shape_c:
            raise ValueError(f"statistic {name!r}: reference bins {shape} differ from candidate bins {shape_c}")
        n_bins += int(np.sum((r.std(axis=0) > 0) | (c.std(axis=0) > 0)))
    family = (n_bins, len(reference)) if tol.family == "report" else None
    res = {
        name: compare_statistic(reference[name], candidate[name], tol, name=name, family=family) for name in reference
    }
    first = next(iter(res.values()))
    failures = [f"{name}: {msg}" for name, r in res.items() for msg in r["failures"]]
    return {
        "pass": all(r["verdict"]["pass"] for r in res.values()),
        "n_reference": first["n_reference"],
        "n_candidate": first["n_candidate"],
        "tolerances": asdict(tol),
        "statistics": res,
        "failures": failures,
    }


# ---------------------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------------------


def _flat_tensor(x: Any, what: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim < 2:
        raise ValueError(f"{what} must be a batch of maps [N, ...], got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def nearest_neighbour_distances(
    queries: np.ndarray | torch.Tensor,
    references: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    *,
    chunk: int = 256,
    device: str | torch.device | None = None,
    dihedral: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance (in κ units, over all pixels and channels) of each query map to its nearest reference map.

    Args:
        queries: maps [Nq, ...] held in memory.
        references: maps [Nr, ...], or an iterable of such batches (streamed once; memory stays
            O(chunk × Nq)), e.g. batches read from a training store.
        chunk: rows per ``torch.cdist`` block.
        device: where to compute (default: CPU).
        dihedral: also match the 8 rotations/flips of each query (square maps [.., H, W]), so a flipped
            copy of a training map counts as a copy.

    Returns:
        (distance [Nq] float64, index [Nq] int64 of the nearest reference in streaming order).

    Distances are computed in float64 with the matrix-product form of ``cdist``: float32 would leave
    an exact copy at a rounding-noise distance of ~1e-3 of the map norm instead of ~1e-8.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    qt = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(queries))
    if qt.ndim < 2:
        raise ValueError(f"queries must be a batch of maps [N, ...], got shape {tuple(qt.shape)}")
    if dihedral:
        if qt.ndim < 3 or qt.shape[-1] != qt.shape[-2]:
            raise ValueError("dihedral matching needs square maps [N, ..., H, W]")
        variants = [qt, qt.flip(-1)]
        for k in (1, 2, 3):
            rot = torch.rot90(qt, k, dims=(-2, -1))
            variants += [rot, rot.flip(-1)]
        q_all = torch.cat([v.reshape(v.shape[0], -1) for v in variants])
    else:
        q_all = qt.reshape(qt.shape[0], -1)
    nq = qt.shape[0]
    n_var = q_all.shape[0] // max(nq, 1)
    q_all = q_all.to(dev, torch.float64)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    best = torch.full((q_all.shape[0],), math.inf, dtype=torch.float64, device=dev)
    best_idx = torch.full((q_all.shape[0],), -1, dtype=torch.int64, device=dev)
    batches: Iterable[Any] = [references] if isinstance(references, (np.ndarray, torch.Tensor)) else references
    offset = 0
    for batch in batches:
        rb = _flat_tensor(batch, "references")
        if rb.shape[1] != q_all.shape[1]:
            raise ValueError(f"reference maps have {rb.shape[1]} values each, queries {q_all.shape[1]}")
        for lo in range(0, rb.shape[0], chunk):
            rc = rb[lo : lo + chunk].to(dev, torch.float64)
            for qlo in range(0, q_all.shape[0], chunk):
                qc = q_all[qlo : qlo + chunk]
                dist = torch.cdist(qc, rc, compute_mode="use_mm_for_euclid_dist")
                dmin, imin = dist.min(dim=1)
                upd = dmin < best[qlo : qlo + qc.shape[0]]
                best[qlo : qlo + qc.shape[0]] = torch.where(upd, dmin, best[qlo : qlo + qc.shape[0]])
                best_idx[qlo : qlo + qc.shape[0]] = torch.where(
                    upd, imin + offset + lo, best_idx[qlo : qlo + qc.shape[0]]
                )
        offset += rb.shape[0]
    if offset == 0:
        raise ValueError("references hold no maps")
    best = best.reshape(n_var, nq)
    best_idx = best_idx.reshape(n_var, nq)
    which = best.argmin(dim=0)
    d = best.gather(0, which[None]).squeeze(0)
    i = best_idx.gather(0, which[None]).squeeze(0)
    return d.cpu().numpy(), i.cpu().numpy()


def memorization_check(
    candidate: np.ndarray | torch.Tensor,
    training: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    heldout: np.ndarray | torch.Tensor,
    tolerances: MemorizationTolerances | Mapping[str, Any] | None = None,
    *,
    chunk: int = 256,
    device: str | torch.device | None = None,
    dihedral: bool = False,
) -> dict[str, Any]:
    """Pixel-level memorisation check: are candidate maps closer to the training maps than held-out maps?

    Args:
        candidate: candidate maps [N_c, ...] (e.g. mocks).
        training: the maps the emulator was trained on [N_t, ...], or an iterable of batches (streamed
            once, so a generator reading a store batch by batch keeps memory constant).
        heldout: reference maps the emulator never saw [N_h, ...], same pixel layout.
        tolerances: :class:`MemorizationTolerances` or a mapping of its fields.
        chunk, device, dihedral: as in :func:`nearest_neighbour_distances`.

    Returns a dict with the distances (κ units), their medians, ``near_threshold``, the near-copy
    fractions of both sets, the one-sided Mann–Whitney U p-value (candidates closer), ``median_ratio``,
    the index of each candidate's nearest training map, ``pass`` and ``failures``.
    """
    tol = MemorizationTolerances.from_mapping(tolerances)
    ct = candidate if isinstance(candidate, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(candidate))
    ht = heldout if isinstance(heldout, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(heldout))
    if ct.shape[1:] != ht.shape[1:]:
        raise ValueError(
            f"candidate maps {tuple(ct.shape[1:])} and held-out maps {tuple(ht.shape[1:])} differ in shape"
        )
    if ct.shape[0] < 1 or ht.shape[0] < 2:
        raise ValueError(
            f"memorization check needs >= 1 candidate and >= 2 held-out maps, got {ct.shape[0]} and {ht.shape[0]}"
        )
    # One query set, so the training maps are streamed once.
    d, idx = nearest_neighbour_distances(
        torch.cat([ct.to(torch.float64), ht.to(torch.float64)]), training, chunk=chunk, device=device, dihedral=dihedral
    )
    nc = ct.shape[0]
    candidate_distances, heldout_distances, ci = d[:nc], d[nc:], idx[:nc]
    dc = np.asarray(candidate_distances, dtype=np.float64)
    dh = np.asarray(heldout_distances, dtype=np.float64)
    med_h = float(np.median(dh))
    med_c = float(np.median(dc))
    thr = tol.near_factor * med_h
    frac_c = float(np.mean(dc < thr))
    frac_h = float(np.mean(dh < thr))
    if np.all(dc == dc[0]) and np.all(dh == dc[0]):
        p_mw = 1.0
    else:
        p_mw = float(sps.mannwhitneyu(dc, dh, alternative="less").pvalue)
    ratio = med_c / med_h if med_h > 0 else (1.0 if med_c == 0 else math.inf)
    failures = []
    if frac_c > tol.max_near_fraction:
        failures.append(
            f"memorization: {frac_c:.1%} of candidate maps lie within {tol.near_factor} x the median "
            f"held-out distance of a training map (allowed {tol.max_near_fraction:.1%}; held-out "
            f"maps: {frac_h:.1%})"
        )
    if p_mw < tol.pvalue and ratio < tol.median_ratio:
        failures.append(
            f"memorization: candidates are closer to the training maps than held-out maps "
            f"(median ratio {ratio:.2f} < {tol.median_ratio}, Mann-Whitney p = {p_mw:.1e})"
        )
    out: dict[str, Any] = {
        "candidate_distances": dc,
        "heldout_distances": dh,
        "median_candidate": med_c,
        "median_heldout": med_h,
        "median_ratio": ratio,
        "near_threshold": thr,
        "near_fraction_candidate": frac_c,
        "near_fraction_heldout": frac_h,
        "mannwhitney_pvalue": p_mw,
        "n_candidate": int(dc.size),
        "n_heldout": int(dh.size),
        "tolerances": asdict(tol),
        "dihedral": bool(dihedral),
        "candidate_nearest_index": ci,
        "pass": not failures,
        "failures": failures,
    }
    return out


# ---------------------------------------------------------------------------------------------------
# Reporting helpers
# ---------------------------------------------------------------------------------------------------


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


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per statistic of a :func:`compare` result: the headline numbers and the verdicts.

    ``max_abs_frac_error`` is taken over the bins whose reference mean is measured to better than a
    third of itself (|μ_r| > 3 σ_r/sqrt(N_r)): elsewhere (sparse peak bins, PDF tails, zero crossings of
    V2) a fractional error is noise over noise. ``std_ratio_min/max`` span the bins that vary in both sets.
    """
    rows = []
    for name, r in result["statistics"].items():
        se = _farr(r["se_mean"])
        live = se > 0
        mr, sr, sc = _farr(r["mean_reference"]), _farr(r["std_reference"]), _farr(r["std_candidate"])
        measured = np.abs(mr) > 3 * sr / math.sqrt(r["n_reference"])
        frac = _farr(r["frac_error_mean"])
        ratio = _farr(r["std_ratio"])
        both = (sr > 0) & (sc > 0)
        chi2 = r["chi2"]
        corr = r["corr"]
        rows.append(
            {
                "statistic": name,
                "bins": r["n_bins"],
                "max_abs_frac_error": _nanmax_abs(frac[measured]),
                "max_abs_z": _nanmax_abs(_farr(r["z_mean"])[live]),
                "z_allowed": r["mean_sigma_per_bin"],
                "std_ratio_min": float(np.min(ratio[both])) if both.any() else 1.0,
                "std_ratio_max": float(np.max(ratio[both])) if both.any() else 1.0,
                "chi2": chi2["chi2"],
                "dof": chi2["dof"],
                "pvalue": chi2["pvalue_hotelling"],
                "corr_rms": corr["rms"],
                "corr_noise_floor": corr["noise_floor"],
                "corr_tolerance": corr.get("tolerance"),
                "max_abs_t_skew": _nanmax_abs(_farr(r["skewness"]["t"])),
                "max_abs_t_kurt": _nanmax_abs(_farr(r["kurtosis"]["t"])),
                **{f"pass_{k}": v for k, v in r["verdict"].items()},
            }
        )
    return rows


def _farr(x: Any) -> np.ndarray:
    """Float array from numpy or JSON (``None`` for non-finite) form."""
    return np.array([np.nan if v is None else v for v in np.ravel(np.asarray(x, dtype=object))], dtype=float)


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text verdict table of a :func:`compare` result (for logs and the console)."""
    head = (
        f"{'statistic':<24} {'bins':>5} {'max|dμ/μ|':>10} {'max|z|':>7} {'σ ratio':>13} {'χ²/dof':>12} "
        f"{'p':>8} {'corr rms':>15} {'verdict':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in summary_rows(result):
        chi = f"{row['chi2']:.1f}/{row['dof']}" if row["chi2"] is not None else "n/a"
        pv = f"{row['pvalue']:.1e}" if row["pvalue"] is not None else "n/a"
        cr = f"{row['corr_rms']:.3f}<={row['corr_tolerance']:.3f}" if row["corr_rms"] is not None else "n/a"
        lines.append(
            f"{row['statistic']:<24} {row['bins']:>5} {row['max_abs_frac_error']:>10.2%} "
            f"{row['max_abs_z']:>7.2f} {row['std_ratio_min']:>6.3f}-{row['std_ratio_max']:<6.3f} "
            f"{chi:>12} {pv:>8} {cr:>15} {'PASS' if row['pass_pass'] else 'FAIL':>8}"
        )
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: arrays to lists, non-finite floats to ``None`` (strict JSON has no NaN/Inf)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Callable):  # type: ignore[arg-type]
        return getattr(obj, "__name__", str(obj))
    return str(obj)
