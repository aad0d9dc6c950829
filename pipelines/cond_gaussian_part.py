"""How much of a conditional emulator's KL gap its fixed Gaussian part leaves, at chosen cosmologies.

    python pipelines/cond_gaussian_part.py --ckpt <best.ckpt> --out runs/cond/gaussian_part.json
    python pipelines/cond_gaussian_part.py --ckpt <best.ckpt> --out gp_stats.json --error-maps 8000 \
        --theta 0.205,0.705 --theta 0.25,0.75 --theta 0.3833,0.7167

At each θ: fresh simulations from the training store's simulator, and the KL gap (bits/pixel, against the exact
likelihood) of the model's preprocessing + stationary layer alone (the shifted log and the crop Gaussian's ξ(θ), no
Glow) beside that of the whole model. What the Gaussian part leaves is what the Glow has to learn. With
``--error-maps N``, also the C_ℓ and peak-count errors of the mean per bin (``pipelines/conditional.py``'s, 2′
peaks) of N mocks drawn through the Gaussian part alone and of N from the whole model, against N simulations: a bias
the Gaussian part already has is not the Glow's.
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


def gaussian_part_sample(module, n: int, cond: dict, seed: int, batch: int = 500) -> np.ndarray:
    """``n`` maps [n, C, H, W] (κ) drawn through the EMA model's stationary layer and preprocessing alone."""
    glow = module.glow_ema
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for lo in range(0, n, batch):
            b = min(batch, n - lo)
            c = module.normalize_cond(cond, n=b)
            z = torch.randn(b, glow.in_channels, glow.image_size, glow.image_size, generator=gen)
            out.append(glow.preprocess.inverse(glow.stationary.inverse(z, c), c).numpy())
    return np.concatenate(out)


def bin_error_rows(emu, sim, cond: dict, n: int, seed: int) -> dict:
    """C_ℓ and peak errors per bin of the Gaussian part's and the whole model's mocks against ``n`` simulations."""
    from conditional import TARGETS, bin_errors

    from lensflow.validation import statistics_of, summary_config_for

    sims = sim.generate(n, seed=[20261202, seed])
    sets = {"gaussian_part": gaussian_part_sample(emu.model, n, cond, 5000 + seed)}
    sets["full_model"] = emu.sample(n, cond=cond, seed=1000 + seed)
    sc = summary_config_for({}, emu.meta, sims[: min(n, 2000)], seed=seed)
    ref = statistics_of(sims, sc, seed=seed)
    out = {}
    for k, (name, maps) in enumerate(sets.items()):
        st = statistics_of(maps, sc, seed=seed + 1 + k)
        out[name] = {key: bin_errors(ref[key], st[key], tol) for key, tol in TARGETS.items()}
        out[name]["kappa_std_ratio"] = float(maps.std() / sims.std())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps", type=int, default=300, help="fresh simulations per θ")
    p.add_argument("--theta", action="append", default=None, help="Omega_m,sigma_8 (repeatable; default: five θ)")
    p.add_argument("--error-maps", type=int, default=0, help="maps per side for the per-bin C_ℓ / peak errors")
    a = p.parse_args(argv)
    from conditional import parse_theta

    thetas = [parse_theta(t) for t in a.theta] if a.theta else THETAS
    emu = lensflow.load(a.ckpt, device="cpu")
    if emu.model.glow_ema.stationary is None:
        raise SystemExit("error: ckpt: this model has no stationary layer")
    with open_store(emu.store) as st:
        truth = StoreTruth(st.meta, str(st.path))
    rows = []
    for k, theta in enumerate(thetas):
        cond = dict(zip(emu.param_names, theta, strict=True))
        sim = truth.simulator(cond)
        maps = sim.generate(a.maps, seed=[777, k])
        exact = sim.log_prob(maps)
        d = int(np.prod(maps.shape[1:]))
        gauss = kl_gap_bits(exact, gaussian_part_log_prob(emu.model, maps, cond), d)
        full = kl_gap_bits(exact, emu.log_prob(maps, cond=cond), d)
        row = {"theta": list(theta), "maps": a.maps, "gaussian_part": gauss, "full_model": full}
        print(f"θ={theta}: Gaussian part alone {gauss[0]:.5f} ± {gauss[1]:.5f}, full {full[0]:.5f} ± {full[1]:.5f}")
        if a.error_maps:
            row["bin_errors"] = errs = bin_error_rows(emu, sim, cond, a.error_maps, seed=k)
            for name, e in errs.items():
                print(
                    f"  {name}: κ std ratio {e['kappa_std_ratio']:.4f}, C_ell max {100 * e['cl']['frac_max']:.1f}%, "
                    f"peaks max {100 * e['peaks@2.0arcmin']['frac_max']:.1f}% ({a.error_maps} vs {a.error_maps})",
                    flush=True,
                )
        rows.append(row)
    write_json(a.out, {"checkpoint": a.ckpt, "bits_per_pixel": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
