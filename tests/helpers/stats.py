"""The SummaryConfig of the statistics tests: κ bins over fixed ranges, edges counts and scales per test file."""

from __future__ import annotations

from typing import Any

import numpy as np

import lensflow.stats as S


def kappa_config(
    *, pixel_arcmin: float, smoothing_arcmin: tuple[float, ...], n_edges: tuple[int, int, int, int], **kw: Any
) -> S.SummaryConfig:
    """Absolute κ bins (``bin_units="kappa"``), 8 ℓ bins; ``n_edges`` edges for peaks on [-0.01, 0.05], minima on
    [-0.05, 0.01], the PDF on [-0.03, 0.05] and Minkowski thresholds on [-0.02, 0.04]; ``kw`` overrides anything."""
    npk, nmn, npdf, nmk = n_edges
    base = dict(
        pixel_arcmin=pixel_arcmin,
        smoothing_arcmin=smoothing_arcmin,
        ell_nbins=8,
        bin_units="kappa",
        peak_edges=tuple(np.linspace(-0.01, 0.05, npk)),
        minima_edges=tuple(np.linspace(-0.05, 0.01, nmn)),
        pdf_edges=tuple(np.linspace(-0.03, 0.05, npdf)),
        minkowski_thresholds=tuple(np.linspace(-0.02, 0.04, nmk)),
    )
    base.update(kw)
    return S.SummaryConfig(**base)
