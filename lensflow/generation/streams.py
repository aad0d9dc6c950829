"""The random streams of generated map *i*: its latent vectors and its shape noise (seeded per map).

Map ``i`` depends only on ``(seed, i)``: its latent vector ``[C*H*W]`` is drawn by ``torch.randn`` from a
CPU ``torch.Generator`` seeded with :func:`stream_seed` ``(seed, i, k)``, where ``k`` is the attempt (0
unless earlier draws of that map were non-finite); optional shape noise uses its own stream,
:func:`noise_rng` ``(noise.seed, i)``. The recipes are :mod:`lensflow._util.seeds` and never change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lensflow._util.seeds import latent_stream_seed, noise_stream_rng

__all__ = ["STREAMS", "latent_noise", "noise_rng", "stream_seed"]

#: The recipes in words, recorded in every mock store's ``extra["streams"]``.
STREAMS = (
    "latent of map i, attempt k: torch.randn(C*H*W) from a CPU torch.Generator seeded with "
    "s[0] + 2**32 * s[1], s = numpy SeedSequence([seed, i, k]).generate_state(2, uint32); "
    "shape noise of map i: numpy default_rng(SeedSequence([noise.seed, i], spawn_key=(1,)))"
)


def stream_seed(seed: int, index: int, attempt: int = 0) -> int:
    """64-bit seed of the latent stream of map ``index``, attempt ``attempt`` (a SeedSequence hash)."""
    return latent_stream_seed(seed, index, attempt)


def latent_noise(seed: int, indices: Sequence[int] | np.ndarray, dims: int, attempt: int = 0) -> torch.Tensor:
    """Standard-normal latent vectors float32 ``[len(indices), dims]``, one independent stream per map."""
    out = torch.empty((len(indices), dims), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for row, i in enumerate(indices):
        g.manual_seed(stream_seed(seed, int(i), attempt))
        torch.randn(dims, generator=g, out=out[row])
    return out


def noise_rng(seed: int, index: int) -> np.random.Generator:
    """The shape-noise generator of map ``index`` (disjoint from its latent streams)."""
    return noise_stream_rng(seed, index)
