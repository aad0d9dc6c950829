"""The conditional emulator at cosmologies it was not trained on, against the exact likelihood.

    python pipelines/conditional.py --ckpt runs/outputs/train/kappa_cond_cpu/<run>/checkpoints/best.ckpt --out runs/cond

For held-out interior points and points near the box edges (and two training nodes, for the ratio), at each θ:
``validate``'s default comparison of N mocks against N fresh simulations at θ, the C_ℓ and peak-count fractional
errors per well-measured bin (|mean| > 10 standard errors), and the KL gap against the exact likelihood at θ.
Then the KL gap over a grid of the (Ω_m, σ_8) box (a figure), and ``python -m lensflow.infer`` on 100 maps
simulated at held-out θ (posteriors beside the exact and C_ℓ ones). Everything lands in ``--out``.
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

HELD_OUT = {
    "interior": [(0.25, 0.75), (0.3167, 0.8167), (0.35, 0.85), (0.2833, 0.7833)],
    "edge": [(0.21, 0.88), (0.39, 0.72), (0.205, 0.705), (0.395, 0.895)],
    "node": [(0.30, 0.80), (0.2333, 0.8667), (0.3667, 0.7333)],
}


def well_measured_errors(stat: dict) -> tuple[float, float, int]:
    """Max and mean |fractional error| over bins whose reference mean exceeds 10 standard errors."""
    mr, sr = np.asarray(stat["mean_reference"], float), np.asarray(stat["std_reference"], float)
    frac = np.abs(np.asarray(stat["frac_error_mean"], float))
    use = (np.abs(mr) > 10 * sr / math.sqrt(stat["n_reference"])) & np.isfinite(frac)
    return (float(frac[use].max()), float(frac[use].mean()), int(use.sum())) if use.any() else (math.nan, math.nan, 0)


def at_theta(emu, truth, theta, n: int, n_kl: int, seed: int) -> dict:
    cond = dict(zip(emu.param_names, theta, strict=True))
    sim = truth.simulator(cond)
    sims = sim.generate(n, seed=[20261202, seed])
    mocks = emu.sample(n, cond=cond, seed=1000 + seed)
    sc = summary_config_for({}, emu.meta, sims, seed=seed)
    res = compare(statistics_of(sims, sc, seed=seed), statistics_of(mocks, sc, seed=seed + 1), seed=seed)
    cl = well_measured_errors(res["statistics"]["cl"])
    peaks = well_measured_errors(res["statistics"]["peaks@2.0arcmin"])
    gap, se = kl_gap_bits(sim.log_prob(sims[:n_kl]), emu.log_prob(sims[:n_kl], cond=cond), int(np.prod(sims.shape[1:])))
    return {
        "theta": list(theta),
        "n_maps": n,
        "validate_pass": bool(res["pass"]),
        "failures": res["failures"],
        "cl_frac_max": cl[0],
        "cl_frac_mean": cl[1],
        "cl_bins": cl[2],
        "peaks_frac_max": peaks[0],
        "peaks_frac_mean": peaks[1],
        "peaks_bins": peaks[2],
        "cl_frac_per_bin": res["statistics"]["cl"]["frac_error_mean"],
        "peaks_frac_per_bin": res["statistics"]["peaks@2.0arcmin"]["frac_error_mean"],
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
    p.add_argument("--maps", type=int, default=2000, help="mocks and simulations per held-out θ")
    p.add_argument("--kl-maps", type=int, default=500, help="maps scored for the KL gap at each θ")
    p.add_argument("--kl-grid", type=int, default=9, help="KL map points per parameter")
    p.add_argument("--kl-grid-maps", type=int, default=200)
    p.add_argument("--infer-maps", type=int, default=25, help="maps per held-out interior θ for infer")
    p.add_argument("--infer-grid", type=int, default=15, help="infer's grid nodes per parameter (exact: ~3 s each)")
    p.add_argument("--skip-infer", action="store_true")
    a = p.parse_args(argv)
    setup_logging()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    emu = lensflow.load(a.ckpt, device="cpu")
    with open_store(emu.store) as st:
        truth = StoreTruth(st.meta, str(st.path))
        nodes = [tuple(r) for r in truth.grid_points.tolist()]
    box = [(min(v[i] for v in nodes), max(v[i] for v in nodes)) for i in range(2)]
    results: dict = {"checkpoint": a.ckpt, "box": box, "points": {}}
    t0 = time.time()
    for kind, thetas in HELD_OUT.items():
        results["points"][kind] = []
        for k, theta in enumerate(thetas):
            r = at_theta(emu, truth, theta, a.maps, a.kl_maps, seed=100 * len(results["points"]) + k)
            results["points"][kind].append(r)
            print(
                f"{kind:8s} θ={theta}: validate {'PASS' if r['validate_pass'] else 'FAIL'}, C_ell max "
                f"{100 * r['cl_frac_max']:.1f}%, peaks max {100 * r['peaks_frac_max']:.1f}% "
                f"({r['peaks_bins']} bins), KL {r['kl_bits_per_dim']:.5f} ± {r['kl_se']:.5f}",
                flush=True,
            )
    node_kl = np.mean([r["kl_bits_per_dim"] for r in results["points"]["node"]])
    held_kl = np.mean([r["kl_bits_per_dim"] for k in ("interior", "edge") for r in results["points"][k]])
    results["kl_ratio_heldout_to_nodes"] = float(held_kl / node_kl)
    print(f"mean KL: held-out {held_kl:.5f}, nodes {node_kl:.5f}, ratio {held_kl / node_kl:.2f}", flush=True)
    results["kl_map"] = kl_map(emu, truth, box, a.kl_grid, a.kl_grid_maps)
    kl_figure(results["kl_map"], nodes, HELD_OUT, out / "kl_gap_box.png")
    results["seconds"] = time.time() - t0
    write_json(out / "heldout.json", to_plain(results, nan_to_none=True))
    if not a.skip_infer:
        run_infer(a, out)
    return 0


def run_infer(a: argparse.Namespace, out: Path) -> None:
    """Simulate maps at the held-out interior θ (a zip grid store), then ``lensflow.infer`` on them."""
    from lensflow import cli
    from lensflow.inference import infer
    from lensflow.simulate import simulate

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
        ],
    )
    summary = infer(cfg)
    print(json.dumps(summary["aggregate"], indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())
