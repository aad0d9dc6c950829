"""Tiny map stores and checkpoints: the recipes every test that needs "some maps" or "a trained model" uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensflow.mapstore import StoreMeta, write_store

from .cosmology import PLANCK18_MASSLESS

#: The spec of a small simulated store (32x32 lognormal maps, massless neutrinos: a fast CAMB set-up).
TINY_SPEC: dict[str, Any] = {
    "n_maps": 400,
    "npix": 32,
    "pixel_arcmin": 3.28,
    "sim": {"cosmology": {"m_nu": PLANCK18_MASSLESS["m_nu"]}},
    "progress": False,
}


def noise_store(
    path: Path,
    *,
    n: int = 48,
    channels: int = 1,
    npix: int = 16,
    cond: Sequence[str] = (),
    periodic: bool = False,
    pixel_arcmin: float = 2.0,
    seed: int = 1,
    source_redshifts: Sequence[float] | None = None,
    param_ranges: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """A store of ``n`` maps N(0, 0.02²) [n, channels, npix, npix]; with ``cond`` (two names) per-map params drawn
    from {0.25, 0.3, 0.35} x {0.75, 0.85}, or with ``param_ranges`` uniformly from one ``(low, high)`` per name
    (drawn after the maps, one name after the other); source redshifts 0.5, 1.0 for the channels unless
    ``source_redshifts`` are given."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(0.0, 0.02, (n, channels, npix, npix)).astype(np.float32)
    params = None
    if cond and param_ranges is not None:
        params = np.stack([rng.uniform(low, high, n) for low, high in param_ranges], axis=1)
    elif cond:
        params = np.stack([rng.choice([0.25, 0.3, 0.35], n), rng.choice([0.75, 0.85], n)], axis=1)
    zs = (0.5, 1.0)[:channels] if source_redshifts is None else tuple(source_redshifts)
    meta = StoreMeta(pixel_arcmin, zs, periodic=periodic, param_names=tuple(cond))
    return write_store(path, maps, meta, params=params)


def simulated_store(cache_dir: Path, spec: Mapping[str, Any] | None = None) -> Path:
    """:func:`lensflow.simulation.ensure_simulated` of ``spec`` (default :data:`TINY_SPEC`) in ``cache_dir``."""
    from lensflow.simulation import ensure_simulated

    return ensure_simulated(dict(TINY_SPEC if spec is None else spec), cache_dir)


def train_tiny(
    store: Path,
    *,
    cond: Sequence[str] = (),
    model: Mapping[str, Any] | None = None,
    module_kwargs: Mapping[str, Any] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    steps: int = 3,
) -> tuple[Any, Any]:
    """A tiny GlowModule trained ``steps`` steps on ``store`` by a Lightning Trainer: (module, trainer).

    Built as :mod:`lensflow.train` builds it (the store's ``meta``, ``npix`` and path; normalisation and training
    box fitted on the training split); the default model is 2 levels x 2 steps x 16 hidden without the stationary
    Gaussian layer (fast)."""
    import lightning as L

    from lensflow.training import GlowModule, KappaDataModule

    dm = KappaDataModule(store, batch_size=batch_size, num_workers=0, cond=list(cond) or None)
    kwargs = {"check": {"every": 0, "final": False}, "seed": 3, **dict(module_kwargs or {})}
    module = GlowModule(
        model=dict(model or {"levels": 2, "steps": 2, "hidden": 16, "stationary": False}),
        param_names=dm.param_names,
        meta=dm.meta,
        npix=dm.npix,
        store=dm.store_path,
        **kwargs,
    )
    mean, std = dm.cond_stats(log=module.model.cond_log)
    module.model.fit_normalization(
        dm.normalization_maps(), mean, std, params=dm.normalization_params(), box=dm.cond_box()
    )
    trainer = L.Trainer(
        **{
            "max_steps": steps,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "use_distributed_sampler": False,
            **dict(trainer_kwargs or {}),
        }
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


def tiny_checkpoint(
    tmp: Path, name: str, channels: int = 1, cond: Sequence[str] = (), periodic: bool = False, perturb: float = 0.05
) -> Path:
    """A real lensflow checkpoint: a tiny GlowModule (2 levels x 2 steps x 16 hidden) trained 3 steps on a
    :func:`noise_store` of 48 maps 16², its EMA weights then perturbed by ``perturb`` (seeded) so that every map
    depends visibly on its condition (three steps barely move the zero-initialised conditioning layers)."""
    import torch

    store = noise_store(tmp / f"{name}.h5", channels=channels, cond=cond, periodic=periodic)
    module, trainer = train_tiny(store, cond=cond)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.model.glow_ema.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g))
    module.model.glow_ema.clear_cache()
    ckpt = tmp / f"{name}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt
