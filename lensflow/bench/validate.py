"""Validation bench: the false-FAIL rate and the power of ``validate``'s default verdict, measured by simulation.

``python -m lensflow.bench validate`` draws pairs of map sets with :class:`~lensflow.sims.flat.FlatSimulator`
(64² shifted-lognormal maps at 3.28′, Planck 2018, z_s = 1: the kappa_cpu field) and runs validate's own
measurement and comparison on each pair (:func:`lensflow.validation.summary_config_for`,
:func:`~lensflow.validation.statistics_of`, :func:`lensflow.compare.compare`, default tolerances: permutation
calibration and the omnibus test). For each number of maps per set it reports

- the **false-FAIL rate**: pairs of two independent sets of the same simulations that fail;
- the **power** against named departures of the candidate set: σ_8 ± 1 % and ± 2 %, a 3 % larger lognormal
  shift λ, Gaussian fields with the same C_ℓ, a tilt of C_ℓ by 0.05 in spectral index (C_ℓ × (ℓ/1000)^0.05:
  ±5 % at ℓ = 360 and 2,800, −11 % at the map's lowest ℓ ≈ 100), and an emulator's mocks at temperature 0.95
  against its mocks at temperature 1 (only with ``emulator=PATH``);

each as the fraction of pairs failing with a 95 % Wilson interval. The baseline of every row is the null.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lensflow._util.log import get_logger
from lensflow._util.progress import progress
from lensflow.bench import suite_config
from lensflow.compare import Tolerances, compare
from lensflow.mapstore import StoreMeta
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18, convergence_cl
from lensflow.validation import statistics_of, summary_config_for

if TYPE_CHECKING:
    from lensflow.emulator import Emulator

log = get_logger(__name__)

#: The keys of conf/bench/validate.yaml.
KEYS: tuple[str, ...] = (
    "npix",
    "pixel_arcmin",
    "sizes",
    "null_pairs",
    "power_pairs",
    "departures",
    "emulator",
    "permutations",
    "seed",
    "threads",
)
#: Departures the bench knows, by name.
DEPARTURES = ("sigma8+1%", "sigma8-1%", "sigma8+2%", "sigma8-2%", "shift+3%", "gaussian", "tilt+5%", "T=0.95")
_TILT_PIVOT, _TILT = 1000.0, 0.05

Draw = Callable[[int, list[int]], np.ndarray]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _simulator(npix: int, pixel_arcmin: float, **kw: Any) -> FlatSimulator:
    cosmo = dict(PLANCK18)
    if "sigma_8" in kw:
        cosmo["sigma_8"] = kw.pop("sigma_8")
    return FlatSimulator(npix, pixel_arcmin, cosmo, 1.0, **kw)


def candidates(
    name: str, npix: int, pixel_arcmin: float, fiducial: FlatSimulator, emulator: Emulator | None
) -> tuple[Draw, Draw]:
    """``(reference draw, candidate draw)`` of a departure: each maps (n, seed words) to maps [n, 1, npix, npix]."""

    def sims(s: FlatSimulator) -> Draw:
        return lambda n, seed: s.generate(n, seed=seed)

    if name == "T=0.95":
        if emulator is None:
            raise ValueError("bench validate: the T=0.95 departure needs emulator=PATH")

        def at(t: float) -> Draw:
            return lambda n, seed: emulator.sample(
                n, temperature=t, seed=int(np.random.SeedSequence(seed).generate_state(1)[0])
            )

        return at(1.0), at(0.95)
    if name.startswith("sigma8"):
        frac = float(name[len("sigma8") : -1]) / 100.0
        return sims(fiducial), sims(_simulator(npix, pixel_arcmin, sigma_8=PLANCK18["sigma_8"] * (1 + frac)))
    if name == "shift+3%":
        return sims(fiducial), sims(_simulator(npix, pixel_arcmin, shift=1.03 * float(fiducial.shift[0])))
    if name == "gaussian":
        return sims(fiducial), sims(_simulator(npix, pixel_arcmin, kind="gaussian"))
    if name == "tilt+5%":

        def tilted(ell: np.ndarray) -> np.ndarray:
            return convergence_cl(ell, PLANCK18, 1.0) * (ell / _TILT_PIVOT) ** _TILT  # [n_ell] for one source

        return sims(fiducial), sims(FlatSimulator(npix, pixel_arcmin, None, 1.0, cl=tilted, shift=fiducial.shift))
    raise ValueError(f"bench validate: unknown departure {name!r}; known: {list(DEPARTURES)}")


def fails(ref: np.ndarray, cand: np.ndarray, meta: StoreMeta, tol: Tolerances, seed: int) -> bool:
    """Whether validate's default measurement and verdict fail the pair."""
    sc = summary_config_for({}, meta, ref, seed=seed)
    res = compare(statistics_of(ref, sc, seed=seed), statistics_of(cand, sc, seed=seed + 1), tol, seed=seed)
    return not res["pass"]


def rate(draw_ref: Draw, draw_cand: Draw, n: int, pairs: int, tag: str, meta: StoreMeta, tol: Tolerances, seed: int):
    """Failing pairs among ``pairs`` pairs of ``n`` maps per set."""
    k = 0
    bar = progress(pairs, unit="pair", desc=f"{tag} N={n}")
    for p in range(pairs):
        words = [seed, n, p, zlib.crc32(tag.encode())]
        k += fails(draw_ref(n, [*words, 0]), draw_cand(n, [*words, 1]), meta, tol, seed + p)
        bar.update(1)
    bar.close()
    return k


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """False-FAIL rate and power per size and departure (see the module docstring)."""
    c = suite_config(cfg, KEYS, "validate")
    if c.get("threads"):
        import torch

        torch.set_num_threads(int(c["threads"]))
    for name in c["departures"]:  # before any work: a typo must not cost the sizes before it
        if name not in DEPARTURES and not re.fullmatch(r"sigma8[+-]\d+(\.\d+)?%", str(name)):
            raise ValueError(f"bench validate: unknown departure {name!r}; known: {list(DEPARTURES)} or sigma8±X%")
    npix, pix = int(c["npix"]), float(c["pixel_arcmin"])
    meta = StoreMeta(pixel_arcmin=pix, source_redshifts=(1.0,))
    tol = Tolerances(permutations=c["permutations"])
    fiducial = _simulator(npix, pix)
    emulator: Emulator | None = None
    if c.get("emulator"):
        from lensflow.emulator import Emulator

        emulator = Emulator.load(c["emulator"], device="cpu")
    rows = []
    for n in c["sizes"]:
        t0 = time.time()
        k = rate(
            lambda m, s: fiducial.generate(m, seed=s),
            lambda m, s: fiducial.generate(m, seed=s),
            int(n),
            int(c["null_pairs"]),
            "null",
            meta,
            tol,
            int(c["seed"]),
        )
        rows.append(_row("null", int(n), k, int(c["null_pairs"]), time.time() - t0))
        for name in c["departures"]:
            if name == "T=0.95" and emulator is None:
                log.info("skipping T=0.95: no emulator=PATH")
                continue
            t0 = time.time()
            draw_ref, draw_cand = candidates(name, npix, pix, fiducial, emulator)
            k = rate(draw_ref, draw_cand, int(n), int(c["power_pairs"]), name, meta, tol, int(c["seed"]))
            rows.append(_row(name, int(n), k, int(c["power_pairs"]), time.time() - t0))
    return rows


def _row(name: str, n: int, k: int, pairs: int, seconds: float) -> dict[str, Any]:
    lo, hi = wilson(k, pairs)
    return {
        "benchmark": "validate: false-FAIL rate" if name == "null" else "validate: power",
        "device": "cpu",
        "variant": name,
        "baseline": "null (two sets of one distribution)",
        "value": k / pairs,
        "unit": "fraction of pairs failing",
        "ratio": None,
        "n_per_set": n,
        "pairs": pairs,
        "failing": k,
        "ci95_low": lo,
        "ci95_high": hi,
        "seconds": round(seconds, 1),
    }
