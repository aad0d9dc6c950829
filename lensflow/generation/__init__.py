"""Generation of mock κ maps from a trained Glow: streams, the sampler, the job on disk, workers, ``generate``.

Map ``i`` depends only on ``(seed, i)`` (:mod:`~lensflow.generation.streams`), whatever the batch size or
number of devices; a killed run resumes from ``<out>.parts/`` (:mod:`~lensflow.generation.job`).
``python -m lensflow.generate`` is :func:`generate` behind :mod:`lensflow.cli`.
"""

from lensflow.conditioning import condition_grid
from lensflow.generation.job import GenerationRequest
from lensflow.generation.run import generate
from lensflow.generation.sampler import GenerationError, Sampler, ShapeNoise, sample_maps
from lensflow.generation.streams import latent_noise, noise_rng, stream_seed

__all__ = [
    "GenerationError",
    "GenerationRequest",
    "Sampler",
    "ShapeNoise",
    "condition_grid",
    "generate",
    "latent_noise",
    "noise_rng",
    "sample_maps",
    "stream_seed",
]
