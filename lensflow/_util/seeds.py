"""Every SeedSequence recipe in lensflow, named once (moved verbatim from the modules that used them).

Determinism is part of lensflow's interface (map *i* depends only on (seed, *i*)), so these recipes
must never change: tests compare their outputs bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "child_ints",
    "latent_stream_seed",
    "map_rng",
    "mix",
    "noise_stream_rng",
    "stream_words",
]


def mix(*ints: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing, platform independent)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def child_ints(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds: children ``0..n-1`` of ``SeedSequence(seed)``."""
    ss = np.random.SeedSequence(int(seed))
    return [int(c.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for c in ss.spawn(n)]


def map_rng(seed: int | Sequence[int], index: int) -> np.random.Generator:
    """PCG64 generator of simulated map (or full-sky realization) ``index``: SeedSequence(seed, spawn_key=(index,))."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def stream_words(seed: int, index: int, n_words: int = 3) -> np.ndarray:
    """``n_words`` uint64 state words of per-map stream ``index`` of ``SeedSequence(seed)`` (the SFC64 seeding)."""
    return np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(n_words, np.uint64)


def latent_stream_seed(seed: int, index: int, attempt: int = 0) -> int:
    """64-bit seed of the latent stream of generated map ``index``, attempt ``attempt`` (a SeedSequence hash)."""
    lo, hi = np.random.SeedSequence([seed, index, attempt]).generate_state(2, np.uint32)
    return int(lo) | (int(hi) << 32)


def noise_stream_rng(seed: int, index: int) -> np.random.Generator:
    """Shape-noise generator of generated map ``index``.

    ``spawn_key`` (1,) keeps shape-noise streams disjoint from the latent streams of the same (seed, i).
    """
    return np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(1,)))
