"""How much of a conditional emulator's KL gap its fixed Gaussian part leaves, at chosen cosmologies.

    python pipelines/cond_gaussian_part.py --ckpt <best.ckpt> --out runs/cond/gaussian_part.json

At each θ: fresh simulations from the training store's simulator, and the KL gap (bits/pixel, against the exact
likelihood) of the model's preprocessing + stationary layer alone (the shifted log and the crop Gaussian's ξ(θ), no
Glow) beside that of the whole model. What the Gaussian part leaves is what the Glow has to learn.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

import lensflow
from lensflow._util.atomic import write_json
from lensflow.mapstore import open_store
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.truth import StoreTruth

THETAS = [(0.30, 0.80), (0.3167, 0.8167), (0.25, 0.75), (0.205, 0.705), (0.395, 0.895)]


def layers_log_prob(preprocess, stationary, x: torch.Tensor, cond: torch.Tensor) -> np.ndarray:
    """log p (nats per map) of maps ``x`` under a preprocessing and a stationary layer alone, latents standard normal,
    at normalised conditions ``cond`` [B, P]."""
    with torch.no_grad():
        h, ld = preprocess(x, cond)
        y, ld2 = stationary(h, cond)
        d = y[0].numel()
        lp = (ld + ld2).double() - 0.5 * (y.double() ** 2).sum((1, 2, 3)) - 0.5 * d * math.log(2 * math.pi)
    return lp.numpy()


def gaussian_part_log_prob(module, maps: np.ndarray, cond: dict) -> np.ndarray:
    """log p (nats per map) of the EMA model's preprocessing and stationary layer alone."""
    glow = module.glow_ema
    x = torch.as_tensor(maps, dtype=torch.float32)
    return layers_log_prob(glow.preprocess, glow.stationary, x, module.normalize_cond(cond, n=x.shape[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps", type=int, default=300, help="fresh simulations per θ")
    a = p.parse_args(argv)
    emu = lensflow.load(a.ckpt, device="cpu")
    if emu.module.glow_ema.stationary is None:
        raise SystemExit("error: ckpt: this model has no stationary layer")
    with open_store(emu.store) as st:
        truth = StoreTruth(st.meta, str(st.path))
    rows = []
    for k, theta in enumerate(THETAS):
        cond = dict(zip(emu.param_names, theta, strict=True))
        sim = truth.simulator(cond)
        maps = sim.generate(a.maps, seed=[777, k])
        exact = sim.log_prob(maps)
        d = int(np.prod(maps.shape[1:]))
        gauss = kl_gap_bits(exact, gaussian_part_log_prob(emu.module, maps, cond), d)
        full = kl_gap_bits(exact, emu.log_prob(maps, cond=cond), d)
        rows.append({"theta": list(theta), "maps": a.maps, "gaussian_part": gauss, "full_model": full})
        print(f"θ={theta}: Gaussian part alone {gauss[0]:.5f} ± {gauss[1]:.5f}, full {full[0]:.5f} ± {full[1]:.5f}")
    write_json(a.out, {"checkpoint": a.ckpt, "bits_per_pixel": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
