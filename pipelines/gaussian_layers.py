"""The Gaussian layers alone (no Glow behind them) against the exact likelihood: docs/emulator-design.md rows 9-10.

    python pipelines/gaussian_layers.py [--fit 2048 8000 20000]

Fits the maximum-likelihood shifted log and then each Gaussian layer (the DCT-diagonal stationary filter with and
without its low-mode block, and the crop Gaussian) on training maps of the kappa_quick field, and prints the held-out
KL gap (1,000 maps of an unused seed), the training-map gap, and the ratio of the interior-mean scatter of 4,000 maps
drawn from the layer to that of 4,000 simulations (a crop's large-scale structure; 1 is right).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from lensflow.flows.crop_gaussian import CropGaussian
from lensflow.flows.preprocess import Preprocess
from lensflow.flows.stationary import StationaryGaussian
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18


def log_prob(pre: Preprocess, layer: torch.nn.Module, maps: np.ndarray) -> np.ndarray:
    y, ld = pre(torch.from_numpy(maps).double())
    z, ld2 = layer(y)
    return (ld + ld2 - 0.5 * (z**2).sum((1, 2, 3)) - 0.5 * math.log(2 * math.pi) * z[0].numel()).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", type=int, nargs="+", default=[2048, 8000, 20000], help="training maps to fit on")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    sim = FlatSimulator(64, 3.28, dict(PLANCK18), 1.0, kind="lognormal", periodic=False)
    train = sim.generate(max(a.fit), seed=[0, 0])
    held = sim.generate(1000, seed=[0, 1])
    ref = sim.generate(4000, seed=[5, 5])
    exact_held, exact_train = sim.log_prob(held), sim.log_prob(train[:1000])

    def interior(x: np.ndarray) -> np.ndarray:
        return x[:, 0, 3:-3, 3:-3].mean((1, 2))

    layers = {
        "filter": lambda: StationaryGaussian(1, 64, False, 24),
        "filter + low block 8": lambda: StationaryGaussian(1, 64, False, 24, 0, 8),
        "crop Gaussian": lambda: CropGaussian(1, 64),
    }
    for n in a.fit:
        pre = Preprocess(1, log_shift=True, shift_method="ml").double()
        pre.fit(train[:n])
        y = torch.cat([pre(torch.from_numpy(train[i : i + 1000]).double())[0] for i in range(0, n, 1000)])
        for name, make in layers.items():
            layer = make().double()
            layer.initialize(y)
            gap, se = kl_gap_bits(exact_held, log_prob(pre, layer, held), 4096)
            gap_train, _ = kl_gap_bits(exact_train, log_prob(pre, layer, train[:1000]), 4096)
            z = torch.randn(4000, 1, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            mocks = pre.inverse(layer.inverse(z)).numpy()
            ratio = interior(mocks).std() / interior(ref).std()
            print(
                f"{n:6d} maps  {name:22s} held-out KL {gap:.6f} ± {se:.6f}  training maps {gap_train:+.6f}  "
                f"interior-mean scatter ratio {ratio:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
