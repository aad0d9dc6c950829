"""Standard errors and family thresholds when maps come in correlated groups.

Why
---
Maps cut from one N-body box (or patches of one full-sky map) share its large-scale modes and halos. Their
statistics are correlated, so a set of K groups of n maps carries much less information than K·n independent
maps: the variance of a mean is σ²(1 + (n − 1)ρ̄)/(K n), and with 100–1,000 maps per box the design effect
1 + (n − 1)ρ̄ of κ-map power spectra and peak counts is 10–100 (docs/nbody.md). The label permutations of
:mod:`lensflow.compare.permutation` assume exchangeable maps; on grouped maps they make the thresholds far too
tight, and two sets of simulations from different boxes then fail each other (3 of 17 statistics at
1,500 vs 1,500 maps from 2 and 4 boxes).

How
---
Each set's mean gets the cluster-robust (sandwich) variance of Liang & Zeger (1986), with the small-sample
factor G/(G − 1) (Cameron, Gelbach & Miller 2008),

    V = G/(G − 1) · Σ_g (S_g − n_g x̄)² / N²,      S_g = Σ_{i ∈ g} x_i,

floored at the independent-maps value s²/N of the pooled maps (a group correlation below zero is noise here,
and the floor keeps sparse bins, where one set has no counts, from an SE of zero). Per bin
z = (x̄_c − x̄_r)/√(V_r + V_c). The family-wise threshold is the (1 − α) quantile of max_b |z*_b| over a
bootstrap that resamples whole groups of each set with replacement, centred on the observed means, each draw
studentized by its own clustered variance (the cluster bootstrap-t of the max statistic; Cameron, Gelbach & Miller
2008): it keeps the groups' correlations, the bins' correlations, their discreteness, and the noise of a variance
estimated from few groups (with a fixed SE instead, 20 boxes gave 7 false alarms in 40 null pairs). Maps
without a group (mocks) are groups of one, so an emulator's
i.i.d. mocks against grouped simulations is the case it is for.

Calibration rests on the number of groups, not of maps: a set with G ≳ 20 groups is well calibrated
(tests/test_compare_clusters.py measures the false-alarm rate; docs/validation.md has the table), and
:func:`group_summary` says how many groups a set has, so the report can warn below that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lensflow.compare.permutation import FamilyThresholds, family_outcome, spread_features

__all__ = [
    "GROUPS_CALIBRATED",
    "check_groups",
    "cluster_thresholds",
    "clustered_variance",
    "describe_groups",
    "effective_maps",
    "group_summary",
    "is_grouped",
]

#: Fewest groups per set for which the cluster bootstrap is calibrated (see the module docstring).
GROUPS_CALIBRATED = 20

# Bootstrap draws per block (memory: block × G weights plus block × F floats).
_BLOCK = 128


def check_groups(groups: Any, n: int, what: str) -> np.ndarray:
    """The group ids of ``n`` maps as a flat array; one-line ``ValueError`` naming ``what`` for a wrong length."""
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"{what} groups: {g.shape[0]} ids for {n} maps")
    return g


def _codes(groups: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Dense group codes 0..G-1 of ``n`` maps (``None``: every map its own group)."""
    if groups is None:
        return np.arange(n)
    return np.unique(check_groups(groups, n, what), return_inverse=True)[1].reshape(-1)


def is_grouped(groups: np.ndarray | None) -> bool:
    """Whether any two maps share a group id."""
    return groups is not None and np.unique(np.asarray(groups)).size < np.asarray(groups).size


def group_warnings(groups: tuple[np.ndarray | None, np.ndarray | None]) -> list[str]:
    """``few realizations: ...`` lines for the sets (reference, candidate) whose maps come from fewer than
    :data:`GROUPS_CALIBRATED` groups (``None``: independent maps)."""
    out = []
    for what, g in zip(("reference", "candidate"), groups, strict=True):
        if not is_grouped(g):
            continue
        n_groups = np.unique(g).size
        if n_groups < GROUPS_CALIBRATED:
            out.append(
                f"few realizations: the {what} set's {g.size} maps come from {n_groups} realizations (boxes); its "
                f"standard errors are clustered by realization, which is calibrated from {GROUPS_CALIBRATED} on: "
                "use more boxes with fewer maps each"
            )
    return out


def group_summary(groups: np.ndarray | None, n: int) -> dict[str, int]:
    """``{"maps", "groups", "max_maps_per_group"}`` of one set (``None``: independent maps)."""
    counts = np.bincount(_codes(groups, n, "set"))
    return {"maps": int(n), "groups": int(counts.size), "max_maps_per_group": int(counts.max()) if n else 0}


def _group_sums(x: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums [G, F] and sizes [G] of the rows of ``x``."""
    n_groups = int(codes.max()) + 1 if codes.size else 0
    sums = np.zeros((n_groups, x.shape[1]))
    np.add.at(sums, codes, x)
    return sums, np.bincount(codes, minlength=n_groups).astype(np.float64)


def clustered_variance(x: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Cluster-robust variance [F] of the column means of ``x`` [N, F], with the factor G/(G − 1).

    ``groups`` [N] are the group ids (``None``: independent maps, where this is s²/N with ddof = 1).
    """
    return _side(x, groups, "set")[2]


def _side(x: np.ndarray, groups: np.ndarray | None, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group sums [G, F], group sizes [G] and the clustered variance [F] of the mean of one set ``x`` [N, F]."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    sums, sizes = _group_sums(x, _codes(groups, n, what))
    g = sums.shape[0]
    if g < 2:
        return sums, sizes, np.full(x.shape[1], np.inf)
    dev = sums - sizes[:, None] * x.mean(axis=0)
    return sums, sizes, g / (g - 1) * (dev * dev).sum(axis=0) / n**2


def _resampled(
    sums: np.ndarray, sizes: np.ndarray, mean: np.ndarray, b: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``b`` cluster-bootstrap draws of one set: the mean's deviation from ``mean`` [b, F] and its clustered variance
    [b, F] (Σ_g w_g (S_g − n_g m*)² expanded into products with the group sums, G/(G − 1) as for the data)."""
    g = sizes.size
    w = rng.multinomial(g, np.full(g, 1.0 / g), size=b).astype(np.float64)
    n_b = w @ sizes
    m_b = (w @ sums) / n_b[:, None]
    a_b = w @ (sums * sums) - 2.0 * m_b * (w @ (sizes[:, None] * sums)) + m_b * m_b * (w @ (sizes * sizes))[:, None]
    return m_b - mean, g / max(g - 1, 1) * np.maximum(a_b, 0.0) / (n_b * n_b)[:, None]


def _bootstrap_max_z(
    r: np.ndarray,
    c: np.ndarray,
    groups: tuple[np.ndarray | None, np.ndarray | None],
    draws: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed per-bin z [F], the bootstrap null of max_b |z*_b| [draws] and the per-bin SE [F] of one family."""
    sums_r, sizes_r, v_r = _side(r, groups[0], "reference")
    sums_c, sizes_c, v_c = _side(c, groups[1], "candidate")
    n_r, n_c = r.shape[0], c.shape[0]
    pooled_var = np.concatenate([r, c]).var(axis=0, ddof=1)
    # floor each side at the independent-maps variance of the pooled maps (see the module docstring)
    se = np.sqrt(np.maximum(v_r, pooled_var / n_r) + np.maximum(v_c, pooled_var / n_c))
    live = se > 0
    scale = np.where(live, se, np.inf)
    m_r, m_c = r.mean(axis=0), c.mean(axis=0)
    with np.errstate(invalid="ignore"):
        z = np.where(live, (m_c - m_r) / scale, 0.0)
    null = np.empty(draws)
    floors = (pooled_var / n_r, pooled_var / n_c)
    sides = [(sums_r, sizes_r, m_r), (sums_c, sizes_c, m_c)]
    for lo in range(0, draws, _BLOCK):
        b = min(_BLOCK, draws - lo)
        # studentized: each draw's own clustered SE, so that the null carries the noise of an SE from G boxes
        (dr, vr), (dc, vc) = (_resampled(sums, sizes, m, b, rng) for sums, sizes, m in sides)
        se_b = np.sqrt(np.maximum(vr, floors[0]) + np.maximum(vc, floors[1]))
        with np.errstate(invalid="ignore", divide="ignore"):
            zb = np.where(se_b > 0, (dc - dr) / np.where(se_b > 0, se_b, 1.0), 0.0)
        null[lo : lo + b] = np.abs(zb).max(axis=1) if zb.shape[1] else 0.0
    return z, null, se


def cluster_thresholds(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    groups: tuple[np.ndarray | None, np.ndarray | None],
    *,
    alpha: float,
    draws: int,
    seed: int = 0,
) -> tuple[FamilyThresholds, dict[str, dict[str, np.ndarray]]]:
    """Family thresholds and per-bin z for grouped maps; the drop-in of
    :func:`lensflow.compare.permutation.permutation_thresholds` (same outputs, ``permutations`` = bootstrap draws).

    Args:
        reference: {name: [N_r, F_name]} per-map statistics (flattened bins).
        candidate: {name: [N_c, F_name]}.
        groups: group ids ([N_r], [N_c]) of the two sets; ``None`` for a set of independent maps.
        alpha: family-wise level.
        draws: bootstrap draws (>= 1).
        seed: seed of the draws.

    Returns:
        The thresholds and, per statistic, ``{"z_mean", "z_spread", "se_pooled"}`` where ``se_pooled`` is the
        clustered standard error of the mean difference.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"tolerances.permutations must be an integer >= 1, got {draws!r}")
    names = list(reference)
    r = np.concatenate([np.asarray(reference[k], np.float64) for k in names], axis=1)
    c = np.concatenate([np.asarray(candidate[k], np.float64) for k in names], axis=1)
    n_r = r.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    z_mean, null_mean, se = _bootstrap_max_z(r, c, groups, draws, rng)
    spread = spread_features(np.concatenate([r, c]))
    z_spread, null_spread, _ = _bootstrap_max_z(spread[:n_r], spread[n_r:], groups, draws, rng)

    return family_outcome(reference, (null_mean, null_spread), (z_mean, z_spread), se, alpha)


def describe_groups(groups: tuple[np.ndarray | None, np.ndarray | None], n: tuple[int, int]) -> dict[str, Any]:
    """The calibration record's ``groups`` entry: each set's maps, groups and largest group."""
    return {what: group_summary(g, k) for what, g, k in zip(("reference", "candidate"), groups, n, strict=True)}


def effective_maps(x: np.ndarray, groups: np.ndarray | None) -> float:
    """Median over bins of N·s²/N / V_cluster: the number of independent maps the set is worth."""
    x = np.asarray(x, dtype=np.float64)
    v = clustered_variance(x, groups)
    s2 = x.var(axis=0, ddof=1)
    ok = (v > 0) & np.isfinite(v)
    return float(np.median(s2[ok] / v[ok])) if ok.any() else math.nan
