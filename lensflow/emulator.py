"""The trained emulator for notebooks and scripts: ``lensflow.load(path)`` → :class:`Emulator`.

::

    import lensflow
    emu = lensflow.load("outputs/train/kappa/<run>/checkpoints/best.ckpt")
    maps = emu.sample(100, seed=0)                 # float32 [100, C, H, W], κ
    logp = emu.log_prob(maps)                      # float64 [100], nats per map
    emu.meta.pixel_arcmin, emu.param_names         # the training maps; the conditioning parameters

``sample`` gives the maps of ``python -m lensflow.generate`` with the same seed (map ``i`` depends only on
``(seed, i)``); both use the EMA weights. Conditions are physical values: a dict ``{name: value or [n]
values}`` or an array ``[n, P]`` in the order of :attr:`Emulator.param_names`
(:mod:`lensflow.conditioning`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lensflow._util.checks import check_int
from lensflow._util.devices import resolve_device
from lensflow.generation.sampler import sample_maps
from lensflow.mapstore import StoreMeta
from lensflow.model import KappaFlow, TrainingBox

__all__ = ["Emulator", "load"]


class Emulator:
    """A trained Glow emulator of κ maps: draw maps, evaluate their density (numpy in, numpy out).

    Args:
        model: the trained :class:`lensflow.model.KappaFlow`.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    def __init__(self, model: KappaFlow, device: str | torch.device | None = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = "auto") -> Emulator:
        """The emulator of a checkpoint or exported model file (one-line ``ValueError`` for a missing or foreign
        file)."""
        return cls(KappaFlow.load(path), device)

    @property
    def meta(self) -> StoreMeta:
        """The training store's metadata (pixel scale in arcmin, source redshifts, periodicity, ...)."""
        return self.model.meta

    @property
    def store(self) -> str | None:
        """Path of the training store, as recorded when training started."""
        return self.model.store

    @property
    def param_names(self) -> tuple[str, ...]:
        """The conditioning parameters (``()`` for an unconditional emulator)."""
        return self.model.param_names

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one map."""
        return self.model.map_shape

    @property
    def training_box(self) -> TrainingBox | None:
        """The training split's range of each parameter (``None``: unconditional, or unknown)."""
        return self.model.training_box

    def sample(
        self,
        n: int,
        cond: Any = None,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
        allow_extrapolation: bool = False,
    ) -> np.ndarray:
        """``n`` maps float32 ``[n, C, H, W]`` in κ units, map ``i`` from the streams of ``(seed, i)``.

        ``cond``: physical values (a dict, or ``[n, P]`` / ``[P]``), inside the training box unless
        ``allow_extrapolation``; ``temperature`` 1 samples the trained distribution. Non-finite draws are redrawn
        from the map's next stream, as ``generate`` does.
        """
        return sample_maps(
            self.model,
            n,
            temperature=temperature,
            cond=cond,
            seed=seed,
            batch_size=batch_size,
            device=self.device,
            allow_extrapolation=allow_extrapolation,
        )

    @torch.no_grad()
    def log_prob(self, maps: Any, cond: Any = None, batch_size: int = 256) -> np.ndarray:
        """``log p(κ)`` float64 ``[n]`` in nats per map, of maps ``[n, C, H, W]`` (or one ``[C, H, W]``) in κ.

        The density is the one training fits (the fixed preprocessing's Jacobian included), so it is
        comparable across emulators of the same maps. A map outside the model's support (a pixel at or below the
        shifted log's floor) gets ``-inf``; maps with NaN or Inf pixels raise ``ValueError``.
        """
        x = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        given = tuple(x.shape)
        if x.ndim == len(self.map_shape) and given == tuple(self.map_shape):
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.map_shape):
            raise ValueError(f"maps must have shape [n, {', '.join(map(str, self.map_shape))}], got {given}")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"maps must be numbers, got dtype {x.dtype}")
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"maps: {bad.size} map(s) have NaN or Inf pixels (first: map {int(bad[0])})")
        batch = check_int("batch_size", batch_size, 1)
        rows = self.model.condition_rows(cond, x.shape[0])
        out = np.empty(x.shape[0], dtype=np.float64)
        for lo in range(0, x.shape[0], batch):
            hi = min(lo + batch, x.shape[0])
            xb = torch.as_tensor(np.ascontiguousarray(x[lo:hi], dtype=np.float32), device=self.device)
            lp = self.model.log_prob(xb, None if rows is None else rows[lo:hi])
            out[lo:hi] = lp.detach().double().cpu().numpy()
        return out

    def __repr__(self) -> str:
        c, h, w = self.map_shape
        cond = f", conditioned on {list(self.param_names)}" if self.param_names else ""
        return f"Emulator({c}x{h}x{w} maps of {self.meta.pixel_arcmin:g} arcmin{cond}, on {self.device})"


def load(path: str | os.PathLike, device: str | torch.device | None = "auto") -> Emulator:
    """:meth:`Emulator.load`."""
    return Emulator.load(path, device)
