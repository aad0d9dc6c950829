"""Which training design and polynomial degrees make the conditional Gaussian part exact across the box.

    python pipelines/cond_design.py --out runs/cond/design.json                      # the table in the design notes
    python pipelines/cond_design.py --designs box,pad --per-node 600 --degrees 2/2 --out design.json

The conditional emulator's Gaussian part (the shifted log, whose mean, std and λ are polynomials in θ, then the crop
Gaussian whose ξ(Δ; θ) is a polynomial in each normalised parameter) is fitted, not trained, so a design can be
judged without training a Glow: simulate the design's maps, fit the two layers on them exactly as ``Glow`` does,
and score them against the exact likelihood at held-out θ of the box Ω_m ∈ [0.20, 0.40] × σ_8 ∈ [0.70, 0.90]
(``pipelines/conditional.py``'s interior and edge points, a node and a corner). Designs: ``box``, a 7 × 7 grid
ending at the box edges; ``pad``, 7 × 7 overhanging the box by 1/8 of its width (``kappa_cond_cpu``); ``pad9``,
9 × 9 over the same overhanging box. ``--degrees shift/xi,...``. KL gaps in bits/pixel on ``--maps`` fresh maps per
θ, paired with the exact log p. Costs ~4 min per (design, degrees) at 600 maps a node on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch
from cond_gaussian_part import layers_log_prob  # this folder: the script's own directory is on sys.path

from lensflow._util.atomic import write_json
from lensflow.flows.crop_gaussian import CropGaussian
from lensflow.flows.preprocess import Preprocess
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18

DESIGNS = {  # (Ω_m lo, hi, σ_8 lo, hi, nodes per parameter)
    "box": (0.20, 0.40, 0.70, 0.90, 7),
    "pad": (0.175, 0.425, 0.675, 0.925, 7),
    "pad9": (0.175, 0.425, 0.675, 0.925, 9),
}
TEST = [
    (0.30, 0.80),
    (0.25, 0.75),
    (0.3167, 0.8167),
    (0.205, 0.705),
    (0.395, 0.895),
    (0.21, 0.88),
    (0.39, 0.72),
    (0.20, 0.70),
]
NPIX, PIXEL_ARCMIN = 64, 3.28  # kappa_cond_cpu's maps


def simulator(om: float, s8: float) -> FlatSimulator:
    """kappa_cond_cpu's simulator at (Ω_m, σ_8): lognormal crops, massless neutrinos, the rest Planck 2018."""
    cosmo = dict(PLANCK18, m_nu=0.0, Omega_m=float(om), sigma_8=float(s8))
    return FlatSimulator(NPIX, PIXEL_ARCMIN, cosmo, [1.0], kind="lognormal", pad=2)


def design_maps(name: str, per_node: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The design's maps [N, 1, 64, 64] (float32, as a store holds them) and their θ [N, 2]."""
    lo_om, hi_om, lo_s8, hi_s8, n = DESIGNS[name]
    maps, theta = [], []
    for i, om in enumerate(np.linspace(lo_om, hi_om, n)):
        for j, s8 in enumerate(np.linspace(lo_s8, hi_s8, n)):
            maps.append(simulator(om, s8).generate(per_node, seed=[seed, i, j]).astype(np.float32))
            theta.append(np.tile([om, s8], (per_node, 1)))
    return np.concatenate(maps), np.concatenate(theta)


def fit(maps: np.ndarray, theta: np.ndarray, shift_degree: int, xi_degree: int, space: str = "linear"):
    """The two fitted layers, as ``Glow.fit_preprocessing`` builds them, and the θ normalisation (of θ itself, or of
    log θ with ``space="log"``)."""
    t = np.log(theta) if space == "log" else theta
    mu, sd = t.mean(0), t.std(0)
    cond = torch.as_tensor((t - mu) / sd, dtype=torch.float32)
    x = torch.as_tensor(maps)
    pre = Preprocess(1, log_shift=True, shift_method="ml", cond_dim=2, cond_degree=shift_degree)
    pre.fit(x, cond)
    with torch.no_grad():
        h, _ = pre(x, cond)
    layer = CropGaussian(1, NPIX, cond_dim=2, degree=xi_degree)
    layer.initialize(h, cond)
    return pre, layer, mu, sd, space


def gaps(model, tests: dict) -> list[tuple[float, float]]:
    """KL gap (bits/pixel, SE) of the Gaussian part at each test θ."""
    pre, layer, mu, sd, space = model
    out = []
    for (om, s8), (maps, exact) in tests.items():
        x = torch.as_tensor(maps, dtype=torch.float32)
        t = np.log([om, s8]) if space == "log" else np.array([om, s8])
        c = torch.as_tensor(np.tile((t - mu) / sd, (len(maps), 1)), dtype=torch.float32)
        out.append(kl_gap_bits(exact, layers_log_prob(pre, layer, x, c), int(np.prod(maps.shape[1:]))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--designs", default="box,pad,pad9")
    p.add_argument("--degrees", default="2/2,3/3", help="shift/xi polynomial degrees, comma-separated")
    p.add_argument("--per-node", type=int, default=480, help="maps per design node")
    p.add_argument("--maps", type=int, default=300, help="fresh maps per test θ")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--spaces", default="linear", help="θ the polynomials are in: linear, log, or linear,log")
    a = p.parse_args(argv)
    designs = a.designs.split(",")
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        raise SystemExit(f"error: --designs: unknown {unknown}; choose from {sorted(DESIGNS)}")
    try:
        degrees = [(int(s), int(x)) for s, x in (d.split("/") for d in a.degrees.split(","))]
    except ValueError:
        raise SystemExit(f"error: --degrees: {a.degrees!r} is not a list of shift/xi degrees such as 2/2,3/3") from None
    spaces = a.spaces.split(",")
    if not set(spaces) <= {"linear", "log"}:
        raise SystemExit(f"error: --spaces: {a.spaces!r}; choose from linear, log")
    tests = {}
    for k, (om, s8) in enumerate(TEST):
        sim = simulator(om, s8)
        maps = sim.generate(a.maps, seed=[777, k])
        tests[(om, s8)] = (maps, sim.log_prob(maps))
    rows = []
    for name in designs:
        maps, theta = design_maps(name, a.per_node, a.seed)
        for (ds, dx), space in itertools.product(degrees, spaces):
            t0 = time.time()
            g = gaps(fit(maps, theta, ds, dx, space), tests)
            rows.append(
                {
                    "design": name,
                    "grid": DESIGNS[name],
                    "per_node": a.per_node,
                    "shift_degree": ds,
                    "xi_degree": dx,
                    "theta_space": space,
                    "kl_bits_per_pixel": [v for v, _ in g],
                    "kl_se": [s for _, s in g],
                }
            )
            line = " ".join(f"{v:.5f}" for v, _ in g)
            print(f"{name} {a.per_node}/node degrees {ds}/{dx} in {space} θ: {line}", flush=True)
            print(f"  ({time.time() - t0:.0f} s)", flush=True)
        del maps
    write_json(a.out, {"test_theta": TEST, "test_maps": a.maps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
