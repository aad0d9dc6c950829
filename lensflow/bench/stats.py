"""Benchmark suite ``stats``: the full :func:`lensflow.stats.summarize` against a per-map numpy loop.

The summary: shape noise, C_ℓ in 20 bins, and at two smoothing scales peak and minimum counts, the
pixel PDF, V0–V2 at 20 thresholds and the moments.  The baseline computes the same definitions map by
map with numpy and scipy, the way one would write it by hand (``scipy.ndimage.gaussian_filter``,
slicing for neighbours and finite differences, ``numpy.histogram``); before timing, both are run on the
same maps and must agree, so the figures compare equal work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch

from lensflow._util.units import ARCMIN
from lensflow.bench import suite_config
from lensflow.stats import SummaryConfig, default_ell_edges, kappa_edges, summarize
from lensflow.stats.noise import pixel_noise_sigma

#: The keys of ``conf/bench/stats.yaml`` (where their defaults and meanings are); :func:`run` needs them all.
KEYS: tuple[str, ...] = (
    "n_maps", "npix", "pixel_arcmin", "smoothing_arcmin", "ell_nbins", "minkowski_nbins", "sigma_e", "n_gal",
    "baseline_maps", "check_maps", "repeats", "threads", "gpu_maps", "gpu_npix", "gpu_batch", "seed",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# test maps: a lognormal field with a lensing-like spectrum, made once before timing


def lognormal_maps(n: int, npix: int, pixel_arcmin: float, rng: np.random.Generator) -> np.ndarray:
    """Skewed κ-like maps: exp of a Gaussian field with C_ℓ ∝ ℓ^-1 e^-(ℓ/5000)^2, shifted to mean 0."""
    d = pixel_arcmin * ARCMIN
    ell = 2 * np.pi * np.sqrt(np.fft.fftfreq(npix, d)[:, None] ** 2 + np.fft.rfftfreq(npix, d)[None, :] ** 2)
    cl = np.zeros_like(ell)
    cl[ell > 0] = 1e-9 * (ell[ell > 0] / 1000.0) ** -1.0 * np.exp(-((ell[ell > 0] / 5000.0) ** 2))
    out = np.empty((n, npix, npix))
    for i in range(0, n, 256):
        m = min(n, i + 256) - i
        g = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((m, npix, npix))) * np.sqrt(cl / d**2), s=(npix, npix))
        g /= g.std()
        k = np.exp(0.8 * g)
        out[i : i + m] = 0.02 * (k / k.mean(axis=(1, 2), keepdims=True) - 1.0)
    return out


# --------------------------------------------------------------------------------------------------
# the baseline: the same definitions, one map at a time, numpy + scipy


class NumpyLoop:
    def __init__(self, cfg: SummaryConfig, npix: int) -> None:
        self.cfg = cfg
        pix = cfg.pixel_arcmin
        d = pix * ARCMIN
        ell = 2 * np.pi * np.sqrt(np.fft.fftfreq(npix, d)[:, None] ** 2 + np.fft.rfftfreq(npix, d)[None, :] ** 2)
        w = np.full(npix // 2 + 1, 2.0)
        w[0] = 1.0
        if npix % 2 == 0:
            w[-1] = 1.0
        w = np.broadcast_to(w, ell.shape).ravel()
        e = np.asarray(cfg.ell_edges) if cfg.ell_edges is not None else default_ell_edges(npix, pix, cfg.ell_nbins)
        b = np.searchsorted(e, ell.ravel() * (1 - 1e-9), side="left") - 1
        ok = (b >= 0) & (b < e.size - 1)
        self.ell_bin, self.ell_w, self.nb_ell = b[ok], w[ok], e.size - 1
        self.ell_ok = ok
        self.n_modes = np.bincount(self.ell_bin, weights=self.ell_w, minlength=self.nb_ell)
        self.cl_norm = d**2 / npix**2
        self.edges = kappa_edges(cfg)
        self.sigma_pix = pixel_noise_sigma(pix, cfg.sigma_e or 0.0, cfg.n_gal)

    def one(self, kappa: np.ndarray, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        cfg = self.cfg
        pix = cfg.pixel_arcmin
        if rng is not None:
            kappa = kappa + self.sigma_pix * rng.standard_normal(kappa.shape)
        out: dict[str, np.ndarray] = {}
        f = np.fft.rfft2(kappa)
        p = (f.real**2 + f.imag**2).ravel()[self.ell_ok]
        out["cl"] = np.bincount(self.ell_bin, weights=p * self.ell_w, minlength=self.nb_ell) / self.n_modes
        out["cl"] *= self.cl_norm
        for s in cfg.smoothing_arcmin:
            lab = f"{float(s)!r}arcmin"
            k = ndi.gaussian_filter(kappa, s / pix, mode="wrap" if cfg.periodic else "constant", truncate=4.0)
            c = k[1:-1, 1:-1]
            nbrs = [k[1 + dy : k.shape[0] - 1 + dy, 1 + dx : k.shape[1] - 1 + dx]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]  # fmt: skip
            is_max = np.logical_and.reduce([c > q for q in nbrs])
            is_min = np.logical_and.reduce([c < q for q in nbrs])
            out[f"peaks@{lab}"] = np.histogram(c[is_max], self.edges[f"peaks@{lab}"])[0].astype(float)
            out[f"minima@{lab}"] = np.histogram(c[is_min], self.edges[f"minima@{lab}"])[0].astype(float)
            pe = self.edges[f"pdf@{lab}"]
            out[f"pdf@{lab}"] = np.histogram(k, pe)[0] / (k.size * np.diff(pe))
            # Minkowski functionals on the interior, central differences
            t = self.edges[f"v0@{lab}"]
            kx = 0.5 * (k[1:-1, 2:] - k[1:-1, :-2])
            ky = 0.5 * (k[2:, 1:-1] - k[:-2, 1:-1])
            kxx = k[1:-1, 2:] + k[1:-1, :-2] - 2 * c
            kyy = k[2:, 1:-1] + k[:-2, 1:-1] - 2 * c
            kxy = 0.25 * (k[2:, 2:] - k[2:, :-2] - k[:-2, 2:] + k[:-2, :-2])
            g2 = kx**2 + ky**2
            with np.errstate(invalid="ignore", divide="ignore"):
                curv = np.where(g2 > 0, (2 * kx * ky * kxy - kx**2 * kyy - ky**2 * kxx) / g2, 0.0)
            inside = (c >= t[0]) & (c < t[-1])  # Minkowski δ bins are [t_b, t_b+1)
            cv = c[inside]
            width = np.diff(t)
            mids = 0.5 * (t[1:] + t[:-1])
            srt = np.sort(c, axis=None)
            out[f"v0@{lab}"] = 1.0 - np.searchsorted(srt, mids, side="left") / c.size
            out[f"v1@{lab}"] = np.histogram(cv, t, weights=np.sqrt(g2)[inside])[0] / (4 * c.size * width * pix)
            out[f"v2@{lab}"] = np.histogram(cv, t, weights=curv[inside])[0] / (2 * np.pi * c.size * width * pix**2)
            m = k.mean()
            dk = k - m
            m2 = (dk**2).mean()
            out[f"moments@{lab}"] = np.array([m, m2, (dk**3).mean() / m2**1.5, (dk**4).mean() / m2**2 - 3])
        return out

    def __call__(self, maps: np.ndarray, seed: int | None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed) if self.cfg.sigma_e is not None else None
        rows = [self.one(m, rng) for m in maps]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


# --------------------------------------------------------------------------------------------------


def _config(c: dict[str, Any]) -> SummaryConfig:
    nb = int(c["minkowski_nbins"])
    return SummaryConfig(
        pixel_arcmin=float(c["pixel_arcmin"]),
        smoothing_arcmin=tuple(c["smoothing_arcmin"]),
        ell_nbins=int(c["ell_nbins"]),
        sigma_e=c["sigma_e"],
        n_gal=float(c["n_gal"]),
        noise_seed=int(c["seed"]),
        minkowski_thresholds=tuple(np.linspace(-2.0, 4.0, nb + 1)),
    )


def _check(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Both implementations must give the same statistics (noise aside, drawn by different generators)."""
    if set(a) != set(b):
        raise RuntimeError(f"bench stats: key sets differ: {sorted(set(a) ^ set(b))}")
    for key in a:
        if not np.allclose(a[key], b[key], rtol=1e-7, atol=1e-12 * max(1.0, float(np.abs(b[key]).max()))):
            worst = float(np.max(np.abs(a[key] - b[key])))
            raise RuntimeError(f"bench stats: lensflow and the numpy loop disagree on {key} (max diff {worst:.3g})")


def _timed(fn, *args) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result).  CPU time is the fairer figure on a shared
    machine (it ignores time the process waits for a core); with several threads it sums them."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Time :func:`summarize` on CPU (and CUDA when present) against the numpy loop; ``cfg``: the keys of
    ``conf/bench/stats.yaml``.

    The numpy loop is single-threaded; one lensflow row is reported per entry of ``threads``, so the
    single-thread row compares like with like and the others show what threads add.  ``value`` and
    ``ratio`` come from wall time (best of ``repeats``); ``cpu_ms_per_map`` and ``cpu_ratio`` from
    process CPU time, the steadier figure on a shared machine (summed over threads, so the
    all-thread rows show total work, not latency).
    """
    c = suite_config(cfg, KEYS, "stats")
    threads = c["threads"] if isinstance(c["threads"], (list, tuple)) else [c["threads"]]
    default_threads = torch.get_num_threads()
    threads = list(dict.fromkeys(default_threads if t is None else int(t) for t in threads))
    rng = np.random.default_rng(int(c["seed"]))
    npix, n_maps, nb = int(c["npix"]), int(c["n_maps"]), int(c["baseline_maps"])
    scfg = _config(c)
    maps = lognormal_maps(max(n_maps, nb), npix, scfg.pixel_arcmin, rng)
    loop = NumpyLoop(scfg, npix)

    # equal work: noiseless summaries of a few maps must agree
    quiet = SummaryConfig.from_dict({**scfg.to_dict(), "sigma_e": None, "sigma_ref": None, "bin_units": "kappa"})
    probe = maps[: int(c["check_maps"])]
    _check(summarize(probe, quiet), NumpyLoop(quiet, npix)(probe, None))

    x = torch.from_numpy(maps[:n_maps])
    best_loop = cpu_loop = math.inf
    best = dict.fromkeys(threads, math.inf)
    cpu = dict.fromkeys(threads, math.inf)
    try:
        for _ in range(int(c["repeats"])):
            wall, proc, _ = _timed(loop, maps[:nb], int(c["seed"]))
            best_loop, cpu_loop = min(best_loop, wall), min(cpu_loop, proc)
            for t in threads:
                torch.set_num_threads(t)
                summarize(x[:32], scfg)  # warm-up (allocator, thread pool)
                wall, proc, _ = _timed(summarize, x, scfg)
                best[t], cpu[t] = min(best[t], wall), min(cpu[t], proc)
    finally:
        torch.set_num_threads(default_threads)
    loop_rate = nb / best_loop
    what = (
        f"summary {npix}x{npix}: C_l {scfg.ell_nbins} bins + peaks, minima, PDF, V0-V2 "
        f"({int(c['minkowski_nbins'])} thresholds), moments at {len(scfg.smoothing_arcmin)} scales"
    )
    rows = [
        {"benchmark": what, "device": "cpu", "variant": "numpy loop", "baseline": "numpy loop",
         "value": loop_rate, "unit": "maps/s", "ratio": 1.0, "threads": 1, "maps": nb, "seconds": best_loop,
         "cpu_ms_per_map": 1e3 * cpu_loop / nb, "cpu_ratio": 1.0},
    ]  # fmt: skip
    for t in threads:
        rows.append(
            {"benchmark": what, "device": "cpu", "variant": "lensflow", "baseline": "numpy loop",
             "value": n_maps / best[t], "unit": "maps/s", "ratio": (n_maps / best[t]) / loop_rate,
             "threads": t, "maps": n_maps, "seconds": best[t], "cpu_ms_per_map": 1e3 * cpu[t] / n_maps,
             "cpu_ratio": (cpu_loop / nb) / (cpu[t] / n_maps)}
        )  # fmt: skip
    if torch.cuda.is_available():
        rows += _gpu_rows(c, scfg, rng)
    return rows


def _gpu_rows(
    c: dict[str, Any], scfg: SummaryConfig, rng: np.random.Generator, device: str = "cuda"
) -> list[dict[str, Any]]:
    """The GPU rows: ``gpu_maps`` maps of ``gpu_npix``² (float32, ``gpu_batch`` per call) against the numpy loop.
    ``device`` is a parameter so that the tests can run this code on CPU."""
    npix, n = int(c["gpu_npix"]), int(c["gpu_maps"])
    batch = int(c["gpu_batch"])
    base = lognormal_maps(min(n, batch), npix, scfg.pixel_arcmin, rng)
    loop = NumpyLoop(scfg, npix)
    nb = max(1, int(c["baseline_maps"]) // 4)
    t_loop, _, _ = _timed(loop, base[:nb], int(c["seed"]))
    loop_rate = nb / t_loop
    dev = torch.device(device)
    xb = torch.from_numpy(base).to(dev, torch.float32)
    gen = torch.Generator(device=dev).manual_seed(int(c["seed"]))
    summarize(xb[:64], scfg, generator=gen)  # warm-up
    what = f"summary {npix}x{npix}, {n} maps (float32 on GPU)"
    rows = [{"benchmark": what, "device": "cpu", "variant": "numpy loop", "baseline": "numpy loop",
             "value": loop_rate, "unit": "maps/s", "ratio": 1.0, "maps": nb, "seconds": t_loop}]  # fmt: skip

    def all_batches() -> None:
        # the same block of maps is summarized repeatedly (fresh noise each time): 10^4 distinct
        # 256x256 maps would not change the work, only the setup time
        for start in range(0, n, batch):
            m = min(batch, n - start)
            summarize(xb[:m], scfg, generator=gen)

    t_gpu, _, _ = _timed(all_batches)
    rows.append(
        {"benchmark": what, "device": dev.type, "variant": "lensflow", "baseline": "numpy loop",
         "value": n / t_gpu, "unit": "maps/s", "ratio": (n / t_gpu) / loop_rate, "maps": n, "seconds": t_gpu}
    )  # fmt: skip
    return rows
