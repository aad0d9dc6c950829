"""Two-sample metrics of one statistic [N, F]: Hartlap/Hotelling χ², correlation error and its noise
floor, skewness/kurtosis t-statistics, and the Brown–Forsythe dispersion z.

Each metric has two forms: a public function of the two arrays (``hartlap_chi2(reference, candidate)``),
and a ``*_of`` function of the sets' :class:`Moments`, which :func:`lensflow.compare.compare_statistic`
uses to standardise each set once for all metrics. Definitions and their references are in the
package docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

__all__ = [
    "Moments",
    "as_rows",
    "brown_forsythe_z",
    "chi2_of",
    "correlation_error",
    "correlation_of",
    "hartlap_chi2",
    "influence_gram",
    "moment_tstats",
    "moment_tstats_of",
]

RCOND = 1e-10
# Rows used to estimate the sampling noise of correlation matrices: the floor is an average over many
# pairs, so a few thousand maps pin it down; this caps the N×N Gram matrix at (2·2000)² doubles.
_MAX_NOISE_ROWS = 2000


@dataclass
class Moments:
    """One set's per-bin moments, computed once and shared by every metric."""

    n: int
    mean: np.ndarray  # [F]
    std: np.ndarray  # [F] ddof=1
    m2: np.ndarray  # [F] biased second central moment
    z: np.ndarray  # [N, F] standardised with the biased m2 (0 where m2 == 0)
    g1: np.ndarray  # [F] biased skewness m3/m2^1.5
    beta2: np.ndarray  # [F] biased kurtosis m4/m2^2 (not excess)
    live: np.ndarray  # [F] bool: m2 > 0

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of a set ``x`` [N, F] (float64)."""
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
        return cls(n, mean, std, m2, z, g1, beta2, live)


def as_rows(name: str, arr: Any, which: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """A statistic as float64 rows [N, F] and its bin shape; one line naming it when it is unusable."""
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


def _pair(reference: np.ndarray, candidate: np.ndarray) -> tuple[Moments, Moments]:
    return Moments.of(np.asarray(reference, dtype=np.float64)), Moments.of(np.asarray(candidate, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------
# Hartlap / Hotelling χ²
# ---------------------------------------------------------------------------------------------------


def hartlap_chi2(reference: np.ndarray, candidate: np.ndarray, rcond: float = RCOND) -> dict[str, Any]:
    """Hartlap-corrected χ² of the mean difference of two sets [N, F] against the reference covariance.

    χ² = h · dᵀ S_r⁻¹ d / (1/N_r + 1/N_c), h = (N_r − p − 2)/(N_r − 1), d = mean_c − mean_r, S_r the
    unbiased reference covariance. Bins without reference variance are dropped; S_r is inverted in the
    eigenbasis of the reference correlation matrix keeping modes above ``rcond`` × the largest, so
    ``p`` is the rank used. Returns ``chi2``, ``dof`` (= p), ``pvalue`` (χ²_p), ``pvalue_hotelling``
    (exact F(p, N_r − p) for Gaussian data), ``hartlap``, ``chi2_diag``, ``n_bins_used``, ``note``;
    ``chi2``/``pvalue`` are ``None`` when p ≥ N_r − 2.
    """
    return chi2_of(*_pair(reference, candidate), rcond)


def chi2_of(mr: Moments, mc: Moments, rcond: float = RCOND) -> dict[str, Any]:
    """:func:`hartlap_chi2` from the sets' moments."""
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


# ---------------------------------------------------------------------------------------------------
# Correlation matrices
# ---------------------------------------------------------------------------------------------------


def influence_gram(za: np.ndarray, ra: np.ndarray, zb: np.ndarray, rb: np.ndarray) -> np.ndarray:
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
    return correlation_of(*_pair(reference, candidate), None if sigma is None else float(sps.norm.sf(sigma)))


def correlation_of(
    mr: Moments,
    mc: Moments,
    alpha: float | None,
    groups: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> dict[str, Any]:
    """:func:`correlation_error` from the sets' moments; ``alpha`` is the one-sided noise quantile's tail.

    ``groups`` are the group ids of each set's maps (``None``: independent maps). Maps of one group (one N-body
    box) have correlated influence functions, so the noise floor sums them per group before squaring
    (the cluster-robust covariance; :mod:`lensflow.compare.clusters`).
    """
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
    sr, pr, dr = _noise_weights(mr.n, groups[0])
    sc, pc, dc = _noise_weights(mc.n, groups[1])
    g_rr = _aggregate(_diag_scaled(influence_gram(zr[sr], rr, zr[sr], rr), dr), pr, pr)
    g_cc = _aggregate(_diag_scaled(influence_gram(zc[sc], rc, zc[sc], rc), dc), pc, pc)
    g_rc = _aggregate(influence_gram(zr[sr], rr, zc[sc], rc), pr, pc)
    tr = float(np.trace(g_rr) + np.trace(g_cc))
    tr2 = float(np.sum(g_rr**2) + np.sum(g_cc**2) + 2.0 * np.sum(g_rc**2))
    out["noise_floor"] = math.sqrt(max(tr, 0.0) / M)
    if alpha is not None and tr > 0 and tr2 > 0:
        g, h = tr2 / tr, tr * tr / tr2  # Σδ² ≈ g·χ²_h, matching mean and variance
        out["noise_quantile"] = math.sqrt(g * sps.chi2.isf(alpha, h) / M)
    return out


def _noise_weights(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | float, float]:
    """Rows, aggregation P (a matrix, or a scalar times the identity) and diagonal factor of one set's noise Gram
    K = P G Pᵀ.

    K[u, v] estimates ⟨U_u, U_v⟩ of the independent units' mean influence functions U (the maps, or the groups'
    sums / N), from the rows used: independent maps get P = I/√(m N) (m of N rows, evenly spaced), groups
    P = A/m with A the [G, m] membership matrix and each row's own product G_ii weighted by m/N, since within a
    group's sum the m/N subsample sees every pair (i, j ≠ i) with probability (m/N)² but (i, i) with m/N.
    """
    if groups is None or np.unique(groups).size == np.size(groups):
        rows = _noise_rows(n)
        return rows, 1.0 / math.sqrt(rows.size * n), 1.0
    rows = _noise_rows_grouped(n)
    codes = np.unique(np.asarray(groups)[rows], return_inverse=True)[1].reshape(-1)
    member = np.zeros((int(codes.max()) + 1, rows.size))
    member[codes, np.arange(rows.size)] = 1.0
    return rows, member / rows.size, rows.size / n


def _aggregate(gram: np.ndarray, left: np.ndarray | float, right: np.ndarray | float) -> np.ndarray:
    """P_l G P_rᵀ for matrix or scalar aggregations."""
    out = gram * left if np.isscalar(left) else left @ gram
    return out * right if np.isscalar(right) else out @ np.asarray(right).T


def _diag_scaled(gram: np.ndarray, factor: float) -> np.ndarray:
    if factor != 1.0:
        gram = gram.copy()
        gram[np.diag_indices_from(gram)] *= factor
    return gram


def _noise_rows_grouped(n: int) -> np.ndarray:
    """All rows up to twice ``_MAX_NOISE_ROWS`` (a group's sum needs its maps), evenly spaced beyond."""
    if n <= 2 * _MAX_NOISE_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, 2 * _MAX_NOISE_ROWS).round().astype(np.int64)


def _noise_rows(n: int) -> np.ndarray:
    """The rows (at most ``_MAX_NOISE_ROWS``, evenly spaced) that estimate the correlation noise floor."""
    if n <= _MAX_NOISE_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, _MAX_NOISE_ROWS).round().astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Skewness and kurtosis
# ---------------------------------------------------------------------------------------------------


def moment_tstats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-bin skewness and excess kurtosis of each set's distribution [N, F] and their t-statistics.

    Estimators are the bias-adjusted G1 and G2 (as ``scipy.stats.skew/kurtosis(bias=False)``); the
    standard error of each difference sums both sets' influence-function variances
    (IF_skew = z³ − 3z − g₁ − 1.5 g₁(z² − 1), IF_kurt = z⁴ − β₂ − 4g₁z − 2β₂(z² − 1)). NaN where a bin has
    no variance. The SEs rest on sample 6th and 8th moments: exact for Gaussian data (t has unit spread),
    but for skewed distributions at N ~ 300 they run low (spread ~1.2 for a Gamma(3) variable), which is
    why these t-statistics gate the verdict only on request (``Tolerances.moments_sigma``).
    """
    return moment_tstats_of(*_pair(reference, candidate))


def _skew_kurt(m: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(G1, G2, var(G1), var(G2)) per bin of one set, NaN where the bin has no variance."""
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


def moment_tstats_of(mr: Moments, mc: Moments) -> dict[str, dict[str, np.ndarray]]:
    """:func:`moment_tstats` from the sets' moments."""
    s_r, k_r, vs_r, vk_r = _skew_kurt(mr)
    s_c, k_c, vs_c, vk_c = _skew_kurt(mc)
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (s_c - s_r) / np.sqrt(vs_r + vs_c)
        tk = (k_c - k_r) / np.sqrt(vk_r + vk_c)
    return {
        "skewness": {"reference": s_r, "candidate": s_c, "t": ts},
        "kurtosis": {"reference": k_r, "candidate": k_c, "t": tk},
    }


# ---------------------------------------------------------------------------------------------------
# Dispersion
# ---------------------------------------------------------------------------------------------------


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
