"""Drawing the maps of given indices from a trained Glow, with redraws of non-finite maps (:class:`Sampler`).

A map whose draw is non-finite is drawn again from its next latent stream (attempt ``k + 1``, see
:mod:`lensflow.generation.streams`), up to ``max_attempts`` times; then :class:`GenerationError`.
:func:`sample_maps` is the in-memory API: the maps of ``python -m lensflow.generate`` with the same seed,
temperature and (single) condition.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensflow._util.checks import check_bool, check_int
from lensflow._util.devices import resolve_device
from lensflow.generation.streams import latent_noise, noise_rng
from lensflow.model import KappaFlow

__all__ = ["GenerationError", "Sampler", "ShapeNoise", "check_temperature", "sample_maps"]


class GenerationError(RuntimeError):
    """Generation failed after it started (e.g. a map stayed non-finite); one line, exit code 1."""

    exit_code = 1


def check_temperature(t: Any) -> float:
    """The latent temperature as a positive float."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number, got {t!r}")
    return float(t)


@dataclass(frozen=True)
class ShapeNoise:
    """White shape noise added to every map: σ_pix = sigma_e / sqrt(n_gal · A_pix), one stream per map.

    ``sigma_e`` per ellipticity component, ``n_gal`` per arcmin², ``seed`` of the per-map streams.
    """

    sigma_e: float
    n_gal: float
    seed: int

    @classmethod
    def from_config(cls, noise: Mapping[str, Any] | None, seed: int) -> ShapeNoise | None:
        """The noise model of a ``noise`` node (``sigma_e`` null or 0: none); ``seed`` null = ``seed``."""
        if not noise or noise.get("sigma_e") in (None, 0, 0.0):
            return None
        sigma_e, n_gal = noise.get("sigma_e"), noise.get("n_gal")
        if not isinstance(sigma_e, (int, float)) or not math.isfinite(sigma_e) or sigma_e < 0:
            raise ValueError(f"noise.sigma_e must be a non-negative number (null = no noise), got {sigma_e!r}")
        if not isinstance(n_gal, (int, float)) or not math.isfinite(n_gal) or n_gal <= 0:
            raise ValueError(f"noise.n_gal must be a positive number of galaxies per arcmin², got {n_gal!r}")
        nseed = noise.get("seed")
        nseed = seed if nseed is None else check_int("noise.seed", nseed, 0)
        return cls(float(sigma_e), float(n_gal), int(nseed))

    def to_dict(self) -> dict[str, Any]:
        return {"sigma_e": self.sigma_e, "n_gal": self.n_gal, "seed": self.seed}


class Sampler:
    """Draws the maps of given global indices from one module on one device (finite maps only).

    Args:
        module: a :class:`lensflow.model.KappaFlow` (eval mode, on ``device``).
        device: where the flow runs; latents are drawn on the CPU and moved there.
        seed, temperature: of the latent streams.
        ema: EMA (default) or raw weights.
        max_attempts: draws per map before :class:`GenerationError`.
        noise: optional shape noise.
        allow_extrapolation: draw at conditions outside the model's training box (refused by default).
    """

    def __init__(
        self,
        module: KappaFlow,
        device: torch.device,
        seed: int,
        temperature: float,
        ema: bool = True,
        max_attempts: int = 10,
        noise: ShapeNoise | None = None,
        allow_extrapolation: bool = False,
    ) -> None:
        self.module, self.device, self.seed = module, device, int(seed)
        self.allow_extrapolation = bool(allow_extrapolation)
        self.temperature, self.ema, self.max_attempts, self.noise = float(temperature), bool(ema), max_attempts, noise
        self.shape = tuple(module.map_shape)
        self.dims = int(np.prod(self.shape))
        self.pixel_arcmin = float(module.meta.pixel_arcmin)

    @torch.inference_mode()
    def draw(self, indices: np.ndarray, cond: np.ndarray | None) -> tuple[np.ndarray, list[int]]:
        """Maps float32 ``[B, C, H, W]`` for global ``indices`` with conditions ``[B, P]`` (physical units).

        Returns the maps and the indices of maps that needed a redraw (once per redraw).
        """
        B = len(indices)
        out = np.empty((B, *self.shape), dtype=np.float32)
        todo = np.arange(B)
        redrawn: list[int] = []
        for attempt in range(self.max_attempts):
            z = latent_noise(self.seed, indices[todo], self.dims, attempt).to(self.device)
            # Physical conditions go in as float64; the module normalises them with its training statistics.
            x = self.module.sample(
                len(todo),
                cond=None if cond is None else cond[todo],
                temperature=self.temperature,
                noise=z,
                ema=self.ema,
                allow_extrapolation=self.allow_extrapolation,
            )
            x = x.detach().to("cpu", torch.float32).numpy().reshape(len(todo), *self.shape)
            ok = np.isfinite(x).reshape(len(todo), -1).all(axis=1)
            out[todo[ok]] = x[ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
            redrawn.extend(int(i) for i in indices[todo])
        else:
            raise GenerationError(
                f"map {int(indices[todo[0]])} (and {todo.size - 1} more in its batch) was non-finite in all "
                f"{self.max_attempts} attempts at temperature={self.temperature}; the model is unstable "
                "there (try a lower temperature or another checkpoint)"
            )
        if self.noise is not None:
            out += self._shape_noise(indices)
        return out, redrawn

    def _shape_noise(self, indices: np.ndarray) -> np.ndarray:
        from lensflow.stats import shape_noise

        nz = self.noise
        assert nz is not None
        return np.stack(
            [
                np.asarray(
                    shape_noise(
                        self.shape,
                        self.pixel_arcmin,
                        sigma_e=nz.sigma_e,
                        n_gal=nz.n_gal,
                        generator=noise_rng(nz.seed, int(i)),
                    ),
                    dtype=np.float32,
                )
                for i in indices
            ]
        )


def sample_maps(
    ckpt_or_module: str | os.PathLike | KappaFlow,
    n: int,
    temperature: float = 1.0,
    cond: Mapping[str, Any] | np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    ema: bool = True,
    noise: Mapping[str, Any] | None = None,
    max_attempts: int = 10,
    allow_extrapolation: bool = False,
) -> np.ndarray:
    """Draw ``n`` mock κ maps float32 ``[n, C, H, W]`` in memory (the notebook API).

    The same maps as ``python -m lensflow.generate`` with the same seed, temperature and (single)
    condition: map ``i`` depends only on ``(seed, i)``.

    Args:
        ckpt_or_module: a checkpoint path or a loaded :class:`lensflow.model.KappaFlow`.
        n: number of maps.
        temperature: latent temperature (> 0; 1 = the trained distribution).
        cond: for a conditional model, ``{name: value or [n] values}`` in physical units, or an
            array ``[n, P]`` / ``[P]`` in the order of ``module.param_names``.
        seed: generation seed (>= 0).
        batch_size: maps per forward pass (changes maps only at float32 round-off).
        device: torch device; default CUDA when available, else CPU. A module passed in is moved there.
        ema: sample with the EMA weights (default) or the raw weights.
        noise: optional shape noise ``{"sigma_e": 0.26, "n_gal": 30.0, "seed": None}`` (n_gal per arcmin²).
        max_attempts: draws per map before giving up on a non-finite map.
        allow_extrapolation: draw at conditions outside the training box (refused by default, in one line).
    """
    n = check_int("n", n, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    temperature = check_temperature(temperature)
    dev = resolve_device(device)
    if isinstance(ckpt_or_module, (str, os.PathLike)):
        module = KappaFlow.load(ckpt_or_module, dev)
    else:
        module = ckpt_or_module.to(dev).eval()
    allow = check_bool("allow_extrapolation", allow_extrapolation)
    rows = module.condition_rows(cond, n, allow)
    sampler = Sampler(
        module,
        dev,
        seed,
        temperature,
        check_bool("ema", ema),
        check_int("max_attempts", max_attempts, 1),
        ShapeNoise.from_config(noise, seed),
        allow,
    )
    out = np.empty((n, *sampler.shape), dtype=np.float32)
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        out[idx], _ = sampler.draw(idx, None if rows is None else rows[idx])
    return out
