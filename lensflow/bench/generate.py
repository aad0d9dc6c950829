"""Benchmark ``generate``: mock maps per second of the ``kappa`` and ``kappa_quick`` Glow models.

For each model (the architecture of ``conf/experiment/NAME.yaml`` with random weights: throughput does
not depend on training; or a trained checkpoint via ``ckpt``) and device (CPU, and CUDA when present):

* ``lensflow generate``: :func:`lensflow.generation.generate` end to end, in one process: checkpoint load
  and sha256, per-map seeded latent streams, batched sampling, the finite check, one atomic HDF5 part per
  batch and the final merge into the output store.
* baseline ``one map per call``: the same model and weights drawing one map per ``module.sample(1)``
  call, no I/O -- the loop a user writes to get one reproducible stream per map without batching.
* baseline ``batched sample, no streams/I/O``: one ``module.sample(B)`` per batch from a single
  generator, no per-map streams, nothing written -- the upper bound; its ratio (< 1) is the cost of
  determinism per map, the checks and the I/O.

Both measurements run in the same process on the same weights; timings on CUDA synchronise the device.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensflow.model import KappaFlow

_DEFAULT_BATCH = {"cpu": 16, "cuda": 256}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _experiment(name: str) -> Any:
    """The training config of experiment ``name``, composed by the one composer :func:`lensflow.cli.compose`."""
    from lensflow import cli

    return cli.compose("train", [f"+experiment={name}"])


def build_module(name: str, seed: int = 0) -> KappaFlow:
    """A :class:`~lensflow.model.KappaFlow` with the architecture and map geometry of experiment ``name`` and
    random weights.

    The normalisation is fitted and ActNorm initialised on synthetic shifted-lognormal maps of the
    experiment's size, so sampling runs the same operations as a trained model.
    """
    from omegaconf import OmegaConf

    from lensflow.mapstore import StoreMeta

    cfg = _experiment(name)
    sim = cfg.data.simulate
    # one channel per source bin; NaN redshift for an n(z) bin
    zs = [float(z) if isinstance(z, (int, float)) else float("nan") for z in sim.sim.z_source]
    npix = int(sim.npix)
    names = list(cfg.data.cond or [])
    grid = OmegaConf.to_container(sim.grid, resolve=True) if sim.get("grid") else {}
    meta = StoreMeta(float(sim.pixel_arcmin), tuple(zs), periodic=bool(sim.sim.get("periodic", False)))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    module = KappaFlow(model=model, meta=meta, npix=npix, param_names=names, seed=seed)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((4, len(zs), npix, npix))  # 4 x npix^2 pixels: plenty for ActNorm statistics
    maps = (0.02 * (np.exp(0.8 * g - 0.32) - 1.0)).astype(np.float32)  # shifted lognormal, shift 0.02
    mean = [float(np.mean(grid[n])) if n in grid else 0.3 for n in names]
    module.fit_normalization(maps, mean, [0.05] * len(names))
    cond = None
    if names:
        cond = module.normalize_cond({n: m for n, m in zip(names, mean, strict=True)}, n=maps.shape[0])
    module.initialize(torch.as_tensor(maps), cond)
    return module.eval()


def _cond(module: KappaFlow) -> dict[str, float] | None:
    if not module.param_names:
        return None
    mean = module.cond_mean.detach().cpu().numpy()
    if module.cond_log:  # the mean of log θ: its exp, the geometric mean, is inside the training box too
        mean = np.exp(mean)
    return {n: float(m) for n, m in zip(module.param_names, mean, strict=True)}


def _rate(fn: Any, per_call: int, min_seconds: float, device: torch.device, max_calls: int = 10_000) -> float:
    """Maps per second of ``fn`` (which draws ``per_call`` maps), run for at least ``min_seconds``."""
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or calls >= max_calls:
            return calls * per_call / dt


def _batch(batch: Mapping[str, Any], device: str, model: str) -> int:
    b = batch.get(device, _DEFAULT_BATCH.get(device, 16))
    if isinstance(b, Mapping):
        b = b.get(model, b.get("default", _DEFAULT_BATCH.get(device, 16)))
    return int(b)


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of maps/s for each model and device (see the module docstring); best of ``repeats``."""
    from lensflow.generation import GenerationRequest, generate

    models = list(cfg.get("models") or ["kappa_quick", "kappa"])
    ckpt = cfg.get("ckpt")
    devices = [d for d in (cfg.get("devices") or ["cpu", "cuda"]) if d == "cpu" or torch.cuda.is_available()]
    batch = dict(cfg.get("batch_size") or {})
    min_s = float(cfg.get("min_seconds", 5.0))
    repeats = max(1, int(cfg.get("repeats", 3)))
    seed = int(cfg.get("seed", 0))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-generate-") as tmp:
        targets = [("checkpoint", Path(str(ckpt)))] if ckpt else [(m, None) for m in models]
        for name, path in targets:
            if path is None:
                path = build_module(name, seed).save(Path(tmp) / f"{name}.pt")
            module = KappaFlow.load(path)
            channels, npix, _ = module.map_shape
            n_params = sum(p.numel() for p in module.glow_ema.parameters())
            cond = _cond(module)
            for dev_name in devices:
                device = torch.device(dev_name)
                module = module.to(device)
                B = _batch(batch, dev_name, name)
                g = torch.Generator(device=device).manual_seed(seed)

                def one(m: Any = module, g: torch.Generator = g, c: Any = cond) -> Any:
                    return m.sample(1, cond=c, generator=g)

                def raw(m: Any = module, g: torch.Generator = g, B: int = B, c: Any = cond) -> Any:
                    return m.sample(B, cond=c, generator=g)

                request = GenerationRequest.from_config(
                    {
                        "ckpt": str(path),
                        "out": str(Path(tmp) / "warm.h5"),
                        "n_maps": B,
                        "batch_size": B,
                        "seed": seed,
                        "accelerator": dev_name,
                        "devices": 1,
                        "progress": False,
                        "overwrite": True,
                        "cond": cond or {},
                    }
                )
                # warm-up of every path (kernels, caches, cuDNN autotuning, file system)
                one(), raw()
                generate(request)
                best = {"one": 0.0, "raw": 0.0, "gen": 0.0}
                n = 0
                for _ in range(repeats):  # interleaved, so a busy spell on the machine hits all three
                    best["one"] = max(best["one"], _rate(one, 1, min_s, device))
                    best["raw"] = max(best["raw"], _rate(raw, B, min_s, device))
                    # end to end, checkpoint load and sha256 included: about 4 x min_seconds of maps
                    n = n or max(2 * B, int(np.ceil(best["raw"] * 4 * min_s / B)) * B)
                    _sync(device)
                    t0 = time.perf_counter()
                    generate(dataclasses.replace(request, n_maps=n, out=Path(tmp) / "mocks.h5"))
                    _sync(device)
                    best["gen"] = max(best["gen"], n / (time.perf_counter() - t0))
                common = {
                    "benchmark": f"generate/{name}",
                    "device": dev_name,
                    "params": n_params,
                    "batch": B,
                    "maps": f"{channels}x{npix}x{npix}",
                    "n_generated": n,
                    "threads": torch.get_num_threads() if dev_name == "cpu" else None,
                }
                variant = "lensflow generate (streams, checks, HDF5)"
                rows.append(
                    {
                        **common,
                        "variant": variant,
                        "baseline": "one map per call",
                        "value": best["gen"],
                        "unit": "maps/s",
                        "ratio": best["gen"] / best["one"],
                        "baseline_value": best["one"],
                    }
                )
                rows.append(
                    {
                        **common,
                        "variant": variant,
                        "baseline": "batched sample, no streams/I/O",
                        "value": best["gen"],
                        "unit": "maps/s",
                        "ratio": best["gen"] / best["raw"],
                        "baseline_value": best["raw"],
                    }
                )
            module.to("cpu")
    return rows
