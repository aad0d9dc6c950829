"""The report-level comparison: every statistic together, the way one validation decides.

:func:`compare` runs :func:`~lensflow.compare.verdict.compare_statistic` on each statistic with the family-wise
thresholds of the whole report calibrated by label permutation (:mod:`lensflow.compare.permutation`), then the
tests of the joint summary vector: the correlation matrix of all bins against its noise floor, and the
energy-distance omnibus test (:mod:`lensflow.compare.omnibus`).

When a set's maps come in correlated groups (maps cut from one N-body box, patches of one full-sky map: the
store's realization ids), the thresholds come from the cluster bootstrap instead (:mod:`lensflow.compare.clusters`),
the correlation noise floors sum influence functions per group, and the omnibus test takes one map per group, so
that the maps it relabels are independent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy import stats as sps

from lensflow.compare.clusters import (
    GROUPS_CALIBRATED,
    check_groups,
    cluster_thresholds,
    describe_groups,
    is_grouped,
)
from lensflow.compare.metrics import Moments, as_rows, correlation_of
from lensflow.compare.omnibus import energy_test
from lensflow.compare.permutation import permutation_thresholds
from lensflow.compare.tolerances import Tolerances, family_alpha
from lensflow.compare.verdict import compare_statistic

__all__ = ["compare"]


def compare(
    reference: Mapping[str, Any],
    candidate: Mapping[str, Any],
    tolerances: Tolerances | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    groups: tuple[Any, Any] = (None, None),
) -> dict[str, Any]:
    """Compare per-map statistics of two sets, statistic by statistic, and their joint summary vectors.

    Args:
        reference: {name: array [N_r, ...]} (e.g. from :func:`lensflow.stats.summarize` of simulations).
        candidate: {name: array [N_c, ...]} with the same names and bin shapes.
        tolerances: :class:`Tolerances` or a mapping of its fields (defaults when ``None``).
        seed: seed of the permutations (the verdict is reproducible for a given seed).
        groups: group ids ([N_r], [N_c]) of the maps of each set, e.g. the store's realization ids; maps that share
            an id are correlated (cut from one box). ``None`` for a set of independent maps (mocks).

    Returns:
        dict: ``{"pass": bool, "n_reference", "n_candidate", "tolerances": {...}, "statistics": {name:
        compare_statistic(...)}, "calibration": {...} or None, "omnibus": {...}, "failures": [...]}``.
    """
    tol = Tolerances.from_config(tolerances)
    flat_r, flat_c = _flat_sets(reference, candidate)
    sizes = (next(iter(flat_r.values())).shape[0], next(iter(flat_c.values())).shape[0])
    checked = [
        None if g is None else check_groups(g, n, w)
        for g, n, w in zip(groups, sizes, ("reference", "candidate"), strict=True)
    ]
    groups = tuple(g if is_grouped(g) else None for g in checked)  # ids all distinct: independent maps
    calibrated, calibration = _calibrate(flat_r, flat_c, tol, seed, groups)
    n_bins = sum(int(np.sum((flat_r[k].std(axis=0) > 0) | (flat_c[k].std(axis=0) > 0))) for k in flat_r)
    family = (n_bins, len(reference)) if tol.family == "report" else None
    res = {
        name: compare_statistic(
            reference[name],
            candidate[name],
            tol,
            name=name,
            family=family,
            calibrated=calibrated.get(name),
            groups=groups,
        )
        for name in reference
    }
    first = next(iter(res.values()))
    failures = [f"{name}: {msg}" for name, r in res.items() for msg in r["failures"]]
    joint_corr = _joint_correlation(flat_r, flat_c, tol, groups)
    if joint_corr["pass"] is False:
        failures.append(
            f"joint corr: off-diagonal rms error {joint_corr['rms']:.3f} of the whole summary vector > "
            f"{joint_corr['tolerance']:.3f} (noise floor {joint_corr['noise_floor']:.3f})"
        )
    one_r, one_c = (_one_per_group(flat, g, seed) for flat, g in zip((flat_r, flat_c), groups, strict=True))
    omnibus = energy_test(one_r, one_c, permutations=tol.permutations or 1000, seed=seed, max_maps=tol.omnibus_max_maps)
    omnibus["one_map_per_group"] = any(g is not None for g in groups)
    omnibus["alpha"] = None if tol.omnibus_sigma is None else float(sps.norm.sf(tol.omnibus_sigma) * 2.0)
    omnibus["pass"] = omnibus["alpha"] is None or omnibus["pvalue"] >= omnibus["alpha"]
    if not omnibus["pass"]:
        failures.append(
            f"omnibus: the joint summary vectors differ (energy distance p = {omnibus['pvalue']:.2g} < "
            f"{omnibus['alpha']:.2g}, {omnibus['features']} bins, {omnibus['permutations']} permutations)"
        )
    return {
        "pass": all(r["verdict"]["pass"] for r in res.values()) and omnibus["pass"] and joint_corr["pass"] is not False,
        "n_reference": first["n_reference"],
        "n_candidate": first["n_candidate"],
        "tolerances": asdict(tol),
        "statistics": res,
        "calibration": calibration,
        "joint_corr": joint_corr,
        "omnibus": omnibus,
        "failures": failures,
    }


def _joint_correlation(flat_r: dict, flat_c: dict, tol: Tolerances, groups: tuple) -> dict[str, Any]:
    """The correlation matrix of the whole summary vector (every bin of every statistic): its rms error against
    the noise floor, gated like the per-statistic correlation criterion (one more test in that family)."""
    r = np.concatenate(list(flat_r.values()), axis=1)
    c = np.concatenate(list(flat_c.values()), axis=1)
    alpha = None
    if tol.corr_sigma is not None:
        alpha = family_alpha(float(sps.norm.sf(tol.corr_sigma)), len(flat_r) + 1, tol.multiple_testing)
    corr = correlation_of(Moments.of(r), Moments.of(c), alpha, groups)
    out = {k: corr[k] for k in ("rms", "max", "noise_floor", "noise_quantile", "n_pairs")}
    allow = tol.corr_rms
    if tol.corr_sigma is not None and corr["noise_quantile"] is not None:
        allow = math.sqrt(tol.corr_rms**2 + corr["noise_quantile"] ** 2)
    out["tolerance"] = allow
    out["pass"] = None if corr["rms"] is None else bool(corr["rms"] <= allow)
    return out


def _flat_sets(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> tuple[dict, dict]:
    """Both sets as {name: [N, F]} float64, after checking that they hold the same statistics and bins."""
    missing = sorted(set(reference) ^ set(candidate))
    if missing:
        raise ValueError(f"reference and candidate statistics differ: {missing} present in only one set")
    if not reference:
        raise ValueError("no statistics to compare")
    flat_r, flat_c = {}, {}
    for name in reference:
        r, shape = as_rows(name, reference[name], "reference")
        c, shape_c = as_rows(name, candidate[name], "candidate")
        if shape != shape_c:
            raise ValueError(f"statistic {name!r}: reference bins {shape} differ from candidate bins {shape_c}")
        flat_r[name], flat_c[name] = r, c
    return flat_r, flat_c


def _calibrate(flat_r: dict, flat_c: dict, tol: Tolerances, seed: int, groups: tuple) -> tuple[dict, dict | None]:
    """Thresholds per family (the report, or each statistic) and each statistic's z: label permutations for
    independent maps, the cluster bootstrap (always, since Welch's SE ignores the groups) for grouped ones."""
    grouped = any(g is not None for g in groups)
    if tol.permutations is None and not grouped:
        return {}, None
    families = [list(flat_r)] if tol.family == "report" else [[k] for k in flat_r]
    per_stat: dict[str, dict[str, Any]] = {}
    records = []
    for names in families:
        sets = ({k: flat_r[k] for k in names}, {k: flat_c[k] for k in names})
        if grouped:
            th, z = cluster_thresholds(*sets, groups, alpha=tol.alpha, draws=tol.permutations or 1000, seed=seed)
        else:
            th, z = permutation_thresholds(*sets, alpha=tol.alpha, permutations=tol.permutations, seed=seed)
        records.append({"statistics": names, **asdict(th)})
        for k in names:
            per_stat[k] = {**z[k], "t_mean": th.mean, "t_spread": th.spread}
    if not grouped:
        return per_stat, {"method": "permutation", "families": records}
    n = (next(iter(flat_r.values())).shape[0], next(iter(flat_c.values())).shape[0])
    described = describe_groups(groups, n)
    return per_stat, {
        "method": "cluster bootstrap",
        "families": records,
        "groups": described,
        "groups_calibrated": GROUPS_CALIBRATED,
        "calibrated": all(d["groups"] >= GROUPS_CALIBRATED for d in described.values()),
    }


def _one_per_group(flat: dict, groups: np.ndarray | None, seed: int) -> dict:
    """The set with one map per group (the first of a seeded shuffle); all maps when ``groups`` is ``None``."""
    if groups is None:
        return flat
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 13]))
    order = rng.permutation(groups.size)
    _, first = np.unique(groups[order], return_index=True)
    keep = np.sort(order[first])
    return {k: v[keep] for k, v in flat.items()}
