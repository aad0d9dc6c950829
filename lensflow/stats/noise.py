"""Galaxy shape noise for κ maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._array import ArrayLike, positive

Generator = np.random.Generator | torch.Generator | int | None


def pixel_noise_sigma(pixel_arcmin: float, sigma_e: float = 0.26, n_gal: float = 30.0) -> float:
    """κ noise per pixel, σ_pix = σ_e / sqrt(n_gal A_pix) (σ_e per ellipticity component, n_gal per
    arcmin², A_pix in arcmin²)."""
    pix = positive(pixel_arcmin, "pixel_arcmin")
    se = positive(sigma_e, "sigma_e", allow_zero=True)
    ng = positive(n_gal, "n_gal")
    return se / math.sqrt(ng * pix * pix)


def smoothed_noise_sigma(sigma_e: float, n_gal: float, sigma_arcmin: float) -> float:
    """κ noise after Gaussian smoothing of σ_s arcmin: σ_e / sqrt(4π σ_s² n_gal) (continuum limit).

    This is the usual normalization of the signal-to-noise ν = κ / σ_noise of peak counts.
    """
    se = positive(sigma_e, "sigma_e", allow_zero=True)
    ng = positive(n_gal, "n_gal")
    ss = positive(sigma_arcmin, "sigma_arcmin")
    return se / math.sqrt(4.0 * math.pi * ss * ss * ng)


def shape_noise(
    shape: Sequence[int],
    pixel_arcmin: float,
    sigma_e: float = 0.26,
    n_gal: float = 30.0,
    generator: Generator = None,
    dtype: torch.dtype | None = None,
) -> ArrayLike:
    """White Gaussian κ noise maps of the given shape with σ_pix = σ_e / sqrt(n_gal A_pix).

    ``generator`` decides the output type: a :class:`numpy.random.Generator` or an int seed gives a
    float64 numpy array; a :class:`torch.Generator` gives a tensor on the generator's device (``dtype``,
    default the torch default dtype).  ``None`` draws from a fresh, unseeded numpy generator (not
    reproducible; pass a seed for that).
    """
    try:
        shp = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected a sequence of non-negative integers, got {shape!r}") from None
    if any(s < 0 for s in shp):
        raise ValueError(f"shape: expected non-negative sizes, got {shape!r}")
    sigma = pixel_noise_sigma(pixel_arcmin, sigma_e, n_gal)
    if isinstance(generator, torch.Generator):
        t = torch.randn(shp, generator=generator, device=generator.device, dtype=dtype)
        return t * sigma
    rng = _numpy_rng(generator)
    return rng.standard_normal(shp) * sigma


def _numpy_rng(generator: Any) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise ValueError(
        f"generator: expected a numpy Generator, a torch Generator, an int seed or None, got {generator!r}"
    )


__all__ = ["pixel_noise_sigma", "shape_noise", "smoothed_noise_sigma"]
