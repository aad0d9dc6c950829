"""Per-map shape-noise streams of :func:`lensflow.stats.summarize`: map *i* of a set gets its own stream.

The recipe (numpy's SFC64 bit generator seeded by child *i* of ``SeedSequence(seed)``, normals by the
ziggurat of :func:`lensflow.stats._fused.normal_fill`) lives in :func:`lensflow._util.seeds.stream_words`
and must never change: tests compare the noise bit for bit across chunkings, threads and backends.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lensflow._util.seeds import stream_words

from .config import SummaryConfig
from .noise import pixel_noise_sigma

__all__ = ["NoiseStreams", "kernels"]


def kernels() -> Any:
    """The fused numba kernels (:mod:`lensflow.stats._fused`), imported on first use (numba costs a few
    hundred ms of start-up)."""
    from . import _fused

    return _fused


class NoiseStreams:
    """Draws the noise of each map in map order, so results do not depend on how maps are chunked.

    An int seed on CPU gives every map its own stream (numpy's SFC64 bit generator seeded with child
    ``i`` of ``SeedSequence(seed)`` for map ``i`` of the set, normals by the ziggurat of
    :func:`lensflow.stats._fused.normal_fill`): chunking, threads and backend cannot change the noise,
    and blocks of maps can be drawn in parallel.  A numpy Generator is drawn from in map order; an int seed on an
    accelerator makes a torch generator there, so noise realizations depend on the device.
    """

    def __init__(self, cfg: SummaryConfig, generator: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.sigma = pixel_noise_sigma(cfg.pixel_arcmin, cfg.sigma_e or 0.0, cfg.n_gal)
        self.device, self.dtype = device, dtype
        self.seed: int | None = None
        self.pos = 0  # maps drawn so far
        if generator is None:
            if cfg.noise_seed is None:
                raise ValueError(
                    f"generator: the config adds shape noise (sigma_e={cfg.sigma_e}) but neither a "
                    "generator nor config.noise_seed is given; pass one so the noise is reproducible"
                )
            generator = int(cfg.noise_seed)
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            if device.type == "cpu":
                self.seed = int(generator)
            else:
                generator = torch.Generator(device=device).manual_seed(int(generator))
        elif not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise ValueError(
                f"generator: expected a torch Generator, a numpy Generator or an int seed, got {generator!r}"
            )
        self.gen = generator

    @property
    def per_map(self) -> bool:
        return self.seed is not None

    def fill(self, out: np.ndarray, first: int) -> None:
        """Unit-variance noise of maps ``first, first + 1, ...`` of the set into ``out`` [n, ...]
        (per-map streams only; thread-safe, and the kernel releases the GIL)."""
        assert self.seed is not None
        kern = kernels()
        # without numba the kernels run as plain Python (slow, same numbers), where uint64 wraps on purpose
        with np.errstate(over="ignore"):
            for k in range(out.shape[0]):
                words = stream_words(self.seed, first + k, 3)
                view = out[k]
                dst = view if view.flags.c_contiguous else np.empty(view.shape)
                kern.normal_fill(kern.sfc64_seeded(words), dst.reshape(-1), kern.ZIG_X, kern.ZIG_RATIO)
                if dst is not view:
                    view[...] = dst

    def _torch_unit(self, shape: tuple[int, ...], nmaps: int) -> torch.Tensor:
        g = self.gen
        assert isinstance(g, torch.Generator)
        # torch's normal sampler works in blocks, so draw map by map to stay chunking-independent
        draws = [torch.randn(shape, generator=g, device=g.device, dtype=self.dtype) for _ in range(nmaps)]
        return torch.stack(draws)

    def draw_numpy(self, shape: tuple[int, ...], nmaps: int) -> np.ndarray:
        """Unit-variance noise of the next ``nmaps`` maps as a float64 array (for CPU maps)."""
        if isinstance(self.gen, torch.Generator):
            out = self._torch_unit(shape, nmaps).to("cpu", torch.float64).numpy()
        else:
            out = np.empty((nmaps, *shape))
            if self.per_map:
                self.fill(out, self.pos)
            else:
                # numpy fills arrays element by element from one stream: one call per chunk is the
                # same as one call per map
                self.gen.standard_normal(out=out)
        self.pos += nmaps
        return out

    def draw(self, shape: tuple[int, ...], nmaps: int) -> torch.Tensor:
        """Noise (σ_pix included) of the next ``nmaps`` maps on the maps' device."""
        if self.device.type == "cpu" or not isinstance(self.gen, torch.Generator):
            arr = self.draw_numpy(shape, nmaps)
            return torch.from_numpy(arr).to(self.device, self.dtype).mul_(self.sigma)
        self.pos += nmaps
        return self._torch_unit(shape, nmaps).to(self.device).mul_(self.sigma)
