"""The conditional emulator at cosmologies it was not trained on, against the exact likelihood.

    python pipelines/conditional.py --ckpt runs/outputs/train/kappa_cond_cpu/<run>/checkpoints/best.ckpt --out runs/cond

For held-out interior points and points near the edges of the parameter box Ω_m ∈ [0.20, 0.40] × σ_8 ∈ [0.70, 0.90]
(and three training nodes, for the ratio), at each θ: ``validate``'s default comparison of ``--maps`` mocks against
as many fresh simulations at θ; the C_ℓ and peak-count fractional errors of the mean per bin, from ``--error-maps``
mocks and simulations (the first ``--maps`` of them are the validated ones), each with its standard error; and the
KL gap against the exact likelihood at θ. A bin counts for the accuracy targets (C_ℓ 3 %, peaks 5 %) when it is
well populated: its fractional error is measured to better than half the target (standard error ≤ target / 2), so
a miss of the target is at least a 2σ detection; every bin is in ``heldout.json``. Then the KL gap over a grid
of the box (a figure), and ``python -m lensflow.infer`` on 100 maps simulated at held-out θ with the box as prior
(posteriors beside the exact and C_ℓ ones). Everything lands in ``--out``.

``--theta 0.25,0.75 --seed 5000 --error-maps 24000`` rechecks chosen points with independent simulations and mocks
(``recheck.json``): a bin near the target in the standard run is then measured again, not re-rolled.

The box is the parameter box the emulator must be right in; the training design may extend beyond it
(``kappa_cond_cpu`` overhangs it by 1/8 of its width, so that the box edges are not the edges of its θ fits).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import lensflow
from lensflow._util.atomic import write_json
from lensflow._util.log import setup_logging
from lensflow._util.plain import to_plain
from lensflow.compare import compare
from lensflow.mapstore import open_store
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.truth import StoreTruth
from lensflow.validation import statistics_of, summary_config_for

BOX = [(0.20, 0.40), (0.70, 0.90)]  # (Ω_m, σ_8): the parameter box
HELD_OUT = {
    "interior": [(0.25, 0.75), (0.3167, 0.8167), (0.35, 0.85), (0.2833, 0.7833)],
    "edge": [(0.21, 0.88), (0.39, 0.72), (0.205, 0.705), (0.395, 0.895)],
}
NODE_TARGETS = [(0.30, 0.80), (0.2333, 0.8667), (0.3667, 0.7333)]  # the training nodes nearest these
TARGETS = {"cl": 0.03, "peaks@2.0arcmin": 0.05}


def nearest_nodes(nodes: list, targets: list) -> list:
    """The training node nearest each target (in units of the box), checked to be inside the box."""
    span = np.array([hi - lo for lo, hi in BOX])
    arr = np.asarray(nodes, float)
    out = []
    for t in targets:
        node = tuple(float(v) for v in arr[np.argmin((((arr - np.asarray(t)) / span) ** 2).sum(1))])
        if not all(lo <= v <= hi for v, (lo, hi) in zip(node, BOX, strict=True)):
            raise SystemExit(f"error: no training node near {t} inside the box {BOX}")
        out.append(node)
    return out


def parse_theta(text: str) -> tuple[float, float]:
    """``"0.25,0.75"`` → (Ω_m, σ_8), checked to lie in the box; bad input is one line."""
    try:
        theta = tuple(float(v) for v in text.split(","))
    except ValueError:
        theta = ()
    if len(theta) != 2 or not all(lo <= v <= hi for v, (lo, hi) in zip(theta, BOX, strict=True)):
        raise SystemExit(f"error: --theta {text!r}: want Omega_m,sigma_8 inside the box {BOX}")
    return theta


def bin_errors(ref: np.ndarray, cand: np.ndarray, tol: float) -> dict:
    """Per-bin fractional errors of the mean, (μ_c − μ_r)/|μ_r|, of per-map statistics [N, F] with their standard
    errors, and the max / mean |error| over the well populated bins (standard error ≤ tol / 2)."""
    ref, cand = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
    mr, mc = ref.mean(0), cand.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (mc - mr) / np.abs(mr)
        se = np.sqrt(ref.var(0, ddof=1) / ref.shape[0] + cand.var(0, ddof=1) / cand.shape[0]) / np.abs(mr)
    use = np.isfinite(frac) & np.isfinite(se) & (se <= tol / 2)
    a = np.abs(frac)
    return {
        "frac_max": float(a[use].max()) if use.any() else math.nan,
        "frac_mean": float(a[use].mean()) if use.any() else math.nan,
        "bins_used": int(use.sum()),
        "bins_over_target": int((use & (a > tol)).sum()),
        "frac_per_bin": frac.tolist(),
        "se_per_bin": se.tolist(),
        "used_per_bin": use.tolist(),
        "mean_reference_per_bin": mr.tolist(),
    }


def at_theta(emu, truth, theta, n: int, n_err: int, n_kl: int, seed: int) -> dict:
    cond = dict(zip(emu.param_names, theta, strict=True))
    sim = truth.simulator(cond)
    n_err = max(n, n_err)
    sims = sim.generate(n_err, seed=[20261202, seed])
    mocks = emu.sample(n_err, cond=cond, seed=1000 + seed)
    sc = summary_config_for({}, emu.meta, sims[:n], seed=seed)
    stats_s, stats_m = statistics_of(sims, sc, seed=seed), statistics_of(mocks, sc, seed=seed + 1)
    res = compare({k: v[:n] for k, v in stats_s.items()}, {k: v[:n] for k, v in stats_m.items()}, seed=seed)
    errors = {k: bin_errors(stats_s[k], stats_m[k], tol) for k, tol in TARGETS.items()}
    gap, se = kl_gap_bits(sim.log_prob(sims[:n_kl]), emu.log_prob(sims[:n_kl], cond=cond), int(np.prod(sims.shape[1:])))
    return {
        "theta": list(theta),
        "n_maps": n,
        "validate_pass": bool(res["pass"]),
        "failures": res["failures"],
        "error_maps": n_err,
        "cl": errors["cl"],
        "peaks": errors["peaks@2.0arcmin"],
        "kl_bits_per_dim": gap,
        "kl_se": se,
        "kl_maps": n_kl,
    }


def kl_map(emu, truth, box, points: int, n: int) -> dict:
    axes = [np.linspace(lo, hi, points) for lo, hi in box]
    gap = np.empty((points, points))
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            cond = dict(zip(emu.param_names, (float(a), float(b)), strict=True))
            sim = truth.simulator(cond)
            maps = sim.generate(n, seed=[20261203, i, j])
            gap[i, j] = kl_gap_bits(sim.log_prob(maps), emu.log_prob(maps, cond=cond), int(np.prod(maps.shape[1:])))[0]
    return {"axes": [a.tolist() for a in axes], "kl_bits_per_dim": gap.tolist(), "maps_per_point": n}


def kl_figure(result: dict, nodes: list, held: dict, path: Path) -> None:
    from lensflow.report.figures import figure, save_figure

    x, y = (np.asarray(a) for a in result["axes"])
    gap = np.asarray(result["kl_bits_per_dim"])
    fig = figure(5.4, 4.4, left=0.8, right=1.1, bottom=0.6, top=0.4)
    ax = fig.add_subplot(111)
    mesh = ax.pcolormesh(x, y, 1e3 * gap.T, shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=r"KL gap [$10^{-3}$ bits/pixel]")
    nx, ny = zip(*nodes, strict=True)
    ax.scatter(nx, ny, s=8, c="w", marker="+", label="training nodes")
    for kind, marker in (("interior", "o"), ("edge", "s")):
        hx, hy = zip(*held[kind], strict=True)
        ax.scatter(hx, hy, s=30, facecolors="none", edgecolors="r", marker=marker, label=f"held-out ({kind})")
    ax.set_xlabel(r"$\Omega_m$")
    ax.set_ylabel(r"$\sigma_8$")
    ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path, 120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps", type=int, default=2000, help="mocks and simulations per held-out θ for validate")
    p.add_argument("--error-maps", type=int, default=8000, help="mocks and simulations per θ for the per-bin errors")
    p.add_argument("--kl-maps", type=int, default=500, help="maps scored for the KL gap at each θ")
    p.add_argument("--kl-grid", type=int, default=9, help="KL map points per parameter")
    p.add_argument("--kl-grid-maps", type=int, default=200)
    p.add_argument("--infer-maps", type=int, default=25, help="maps per held-out interior θ for infer")
    p.add_argument("--infer-grid", type=int, default=15, help="infer's grid nodes per parameter (exact: ~3 s each)")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument(
        "--theta",
        action="append",
        default=None,
        help="Omega_m,sigma_8 (repeatable): recheck only these points, with independent seeds (--seed), into "
        "recheck.json; no KL map, ratio or infer",
    )
    p.add_argument("--seed", type=int, default=0, help="added to every point's seed (0: the standard run)")
    a = p.parse_args(argv)
    recheck = [parse_theta(t) for t in a.theta or []]  # before the minutes of loading: bad input fails at once
    setup_logging()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    emu = lensflow.load(a.ckpt, device="cpu")
    with open_store(emu.store) as st:
        truth = StoreTruth(st.meta, str(st.path))
        nodes = [tuple(r) for r in truth.grid_points.tolist()]
    if recheck:
        held = {"recheck": recheck}
    else:
        held = {**HELD_OUT, "node": nearest_nodes(nodes, NODE_TARGETS)}
    results: dict = {"checkpoint": a.ckpt, "box": BOX, "targets": TARGETS, "seed": a.seed, "points": {}}
    t0 = time.time()
    for kind, thetas in held.items():
        results["points"][kind] = []
        for k, theta in enumerate(thetas):
            seed = a.seed + 100 * len(results["points"]) + k
            r = at_theta(emu, truth, theta, a.maps, a.error_maps, a.kl_maps, seed=seed)
            results["points"][kind].append(r)
            cl, pk = r["cl"], r["peaks"]
            print(
                f"{kind:8s} θ=({theta[0]:.4g}, {theta[1]:.4g}): validate {'PASS' if r['validate_pass'] else 'FAIL'}, "
                f"C_ell max {100 * cl['frac_max']:.1f}% ({cl['bins_used']} bins), peaks max "
                f"{100 * pk['frac_max']:.1f}% ({pk['bins_used']} bins), KL {r['kl_bits_per_dim']:.5f} ± "
                f"{r['kl_se']:.5f}",
                flush=True,
            )
    if recheck:
        results["seconds"] = time.time() - t0
        write_json(out / "recheck.json", to_plain(results, nan_to_none=True))
        return 0
    node_kl = np.mean([r["kl_bits_per_dim"] for r in results["points"]["node"]])
    held_kl = np.mean([r["kl_bits_per_dim"] for k in ("interior", "edge") for r in results["points"][k]])
    results["kl_ratio_heldout_to_nodes"] = float(held_kl / node_kl)
    print(f"mean KL: held-out {held_kl:.5f}, nodes {node_kl:.5f}, ratio {held_kl / node_kl:.2f}", flush=True)
    results["kl_map"] = kl_map(emu, truth, BOX, a.kl_grid, a.kl_grid_maps)
    kl_figure(results["kl_map"], nodes, held, out / "kl_gap_box.png")
    results["seconds"] = time.time() - t0
    write_json(out / "heldout.json", to_plain(results, nan_to_none=True))
    if not a.skip_infer:
        run_infer(a, out)
    return 0


def run_infer(a: argparse.Namespace, out: Path) -> None:
    """Simulate maps at the held-out interior θ (a zip grid store), then ``lensflow.infer`` on them."""
    from lensflow import cli
    from lensflow.inference import infer
    from lensflow.simulation import simulate

    om, s8 = zip(*HELD_OUT["interior"], strict=True)
    store = out / "heldout_maps.h5"
    overrides = [
        f"out={store}",
        "overwrite=true",
        f"n_maps={a.infer_maps}",
        "npix=64",
        "pixel_arcmin=3.28",
        "seed=4242",
        "sim.cosmology.m_nu=0.0",
        f"+grid={{Omega_m:{list(om)},sigma_8:{list(s8)}}}",
        "grid_mode=zip",
        "progress=false",
    ]
    simulate(cli.compose("simulate", overrides))
    cfg = cli.compose(
        "infer",
        [
            f"ckpt={a.ckpt}",
            f"maps={store}",
            f"out={out / 'infer'}",
            "max_maps=null",
            "overwrite=true",
            f"grid_points={a.infer_grid}",
            f"+prior.Omega_m=[{BOX[0][0]},{BOX[0][1]}]",
            f"+prior.sigma_8=[{BOX[1][0]},{BOX[1][1]}]",
        ],
    )
    summary = infer(cfg)
    print(json.dumps(summary["aggregate"], indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())
