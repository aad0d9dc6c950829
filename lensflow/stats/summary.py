"""Every statistic of a set of κ maps under one configuration: :func:`summarize` and :func:`with_reference_sigma`.

The torch implementation here is the reference and the GPU path; on CPU :func:`summarize` hands the maps to the
fused numba driver (:mod:`lensflow.stats._summary_fused`).  The configuration and its bins are in
:mod:`lensflow.stats.config` (re-exported here), the per-map noise streams in :mod:`lensflow.stats._streams`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._array import ArrayLike, Batch, border_pixels, border_too_wide, chunks, crop, prepare_maps, to_output
from ._bins import Bins, MinkowskiBins
from ._streams import NoiseStreams
from ._summary_fused import summarize_fused, use_fused
from .config import STATISTICS, SummaryConfig, ell_edges_for, kappa_edges, scale_label, summary_bins
from .minkowski import minkowski_tensor
from .pdf import moments_tensor, pdf_tensor
from .peaks import extrema_counts
from .smoothing import smooth_many
from .spectra import auto_spectra, check_nonempty_bins, cross_spectra, mode_binning


def _layout(batch: Batch) -> tuple[int, int]:
    """(number of maps B, channels C) of a validated batch."""
    if len(batch.lead) == 0:
        return 1, 1
    if len(batch.lead) == 1:
        return batch.lead[0], 1
    return batch.lead[0], batch.lead[1]


def summarize(
    maps: ArrayLike, config: SummaryConfig | Mapping[str, Any], generator: Any = None, backend: str = "auto"
) -> dict[str, ArrayLike]:
    """Measure every configured statistic of a set of maps; one row per map.

    Steps per map: add shape noise (if ``config.sigma_e``), measure C_ℓ, then at every smoothing scale
    smooth and measure peak and minimum counts, the pixel PDF, the Minkowski functionals and the
    moments, with edges converted to κ as :func:`kappa_edges` reports.

    Args:
        maps: [H, W] (one map), [B, H, W] or [B, C, H, W] (C channels per map, e.g. tomographic bins).
        config: a :class:`SummaryConfig` or a mapping accepted by :meth:`SummaryConfig.from_dict`.
        generator: noise source (torch Generator on the maps' device, numpy Generator, or int seed);
            defaults to ``config.noise_seed``.  Pass the same generator object across chunks of one set:
            reusing a seed per chunk repeats the noise.
        backend: ``"fused"``: one-pass numba kernels on blocks of maps in parallel threads (CPU maps,
            kernels narrower than the map); ``"torch"``: tensor operations (the reference, and the GPU
            path); ``"auto"``: fused where it applies.  Both give the same results to round-off.

    Returns:
        ``{key: [B, nfeatures]}`` with keys ``cl``, ``peaks@<σ>arcmin``, ``minima@…``, ``pdf@…``,
        ``v0@…``, ``v1@…``, ``v2@…``, ``moments@…`` (σ as ``2.0arcmin``).  Counts are raw numbers per map,
        the PDF a density, V1 per arcmin, V2 per arcmin², moments (mean, var, skew, kurt).  For C > 1
        channels the features are channel-major ([c0 bins, c1 bins, ...]) and ``cl`` with ``cross``
        holds the pairs (0,0), (0,1), …, (0,C-1), (1,1), … .  :func:`summary_bins` gives the x values.
        numpy in, numpy out; tensor in, tensor out on the same device.
    """
    cfg = SummaryConfig.from_dict(config)
    batch = prepare_maps(maps, "maps", min_size=3)
    nmaps, nchan = _layout(batch)
    npix = batch.npix
    x_all = batch.data.reshape(nmaps, nchan, npix, npix)
    dev, dt = x_all.device, x_all.dtype
    pix = cfg.pixel_arcmin
    border = border_pixels(math.ceil(cfg.border_arcmin / pix - 1e-9))
    if border_too_wide(border, npix, cfg.periodic):
        raise ValueError(f"config.border_arcmin: {cfg.border_arcmin} arcmin leaves nothing of {npix}x{npix} maps")
    noise = NoiseStreams(cfg, generator, dev, dt) if cfg.sigma_e is not None else None
    ell_info = None
    if "cl" in cfg.statistics:
        e = ell_edges_for(cfg, npix)
        ell_info = mode_binning(npix, pix, tuple(e.tolist()))
        check_nonempty_bins(ell_info, npix, pix, e)
    bins: dict[str, Any] = {}
    for key, e in kappa_edges(cfg).items():
        if key.startswith("v1@") or key.startswith("v2@"):
            continue
        bins[key] = MinkowskiBins(e, dev, dt) if key.startswith("v0@") else Bins(e, dev, dt)
    labels = [scale_label(s) for s in cfg.smoothing_arcmin]
    sig_pix = [s / pix for s in cfg.smoothing_arcmin]
    if use_fused(backend, dev, npix, sig_pix):
        return summarize_fused(cfg, batch, x_all, noise, ell_info, bins, labels, sig_pix, border)
    return _summarize_torch(cfg, batch, x_all, noise, ell_info, bins, labels, border)


def _summarize_torch(
    cfg: SummaryConfig,
    batch: Batch,
    x_all: torch.Tensor,
    noise: NoiseStreams | None,
    ell_info: dict[str, np.ndarray] | None,
    bins: dict[str, Any],
    labels: list[str],
    border: int,
) -> dict[str, ArrayLike]:
    """:func:`summarize` with tensor operations (the reference, and the GPU path), chunk by chunk of maps."""
    nmaps, nchan, npix = int(x_all.shape[0]), int(x_all.shape[1]), int(x_all.shape[-1])
    dev, pix, stats = x_all.device, cfg.pixel_arcmin, cfg.statistics
    scales = cfg.smoothing_arcmin
    share_fft = cfg.periodic and any(s / pix > 0 for s in scales)
    cross = nchan > 1 and cfg.cross
    iu = torch.triu_indices(nchan, nchan, device=dev) if "cl" in stats and cross else None
    parts: dict[str, list[torch.Tensor]] = {}

    def put(key: str, value: torch.Tensor, n: int) -> None:
        parts.setdefault(key, []).append(value.reshape(n, -1))

    for sl in chunks(nmaps, nchan * npix * npix, dev):
        x = x_all[sl]
        n = x.shape[0]
        if noise is not None:
            x = x + noise.draw((nchan, npix, npix), n)
        flat = x.reshape(n * nchan, npix, npix)
        # one forward FFT serves C_ℓ and, for periodic maps, every smoothing scale
        f = torch.fft.rfft2(flat) if share_fft or ("cl" in stats and not cross) else None
        if "cl" in stats:
            assert ell_info is not None
            n_ell = ell_info["n_modes"].size
            if iu is not None:
                cl = cross_spectra(x, pix, ell_info, n_ell)[:, iu[0], iu[1]]
            else:
                cl = auto_spectra(flat, pix, ell_info, n_ell, fft=f)
            put("cl", cl, n)
        smoothed = smooth_many(flat, pix, scales, cfg.periodic, fft=f if share_fft else None)
        for lab, y in zip(labels, smoothed, strict=True):
            for key, value in _scale_stats(cfg, y, bins, lab, border):
                put(key, value, n)  # [N*C, bins] -> [N, C*bins], channel-major

    return {key: to_output(torch.cat(vals, dim=0), batch) for key, vals in parts.items()}


def _scale_stats(
    cfg: SummaryConfig, y: torch.Tensor, bins: dict[str, Any], lab: str, border: int
) -> list[tuple[str, torch.Tensor]]:
    """(key, [N*C, ...] values) of every statistic of smoothed maps ``y`` [N*C, H, W] at one scale."""
    stats, periodic = cfg.statistics, cfg.periodic
    out = []
    if "peaks" in stats:
        out.append((f"peaks@{lab}", extrema_counts(y, bins[f"peaks@{lab}"], periodic, border, False)))
    if "minima" in stats:
        out.append((f"minima@{lab}", extrema_counts(y, bins[f"minima@{lab}"], periodic, border, True)))
    if "pdf" in stats:
        out.append((f"pdf@{lab}", pdf_tensor(crop(y, border), bins[f"pdf@{lab}"])))
    if "minkowski" in stats:
        v = minkowski_tensor(y, bins[f"v0@{lab}"], cfg.pixel_arcmin, periodic, border)
        for j, key in enumerate(("v0", "v1", "v2")):
            out.append((f"{key}@{lab}", v[:, j]))
    if "moments" in stats:
        out.append((f"moments@{lab}", moments_tensor(crop(y, border))))
    return out


def with_reference_sigma(
    reference_maps: ArrayLike, config: SummaryConfig | Mapping[str, Any], generator: Any = None
) -> SummaryConfig:
    """Fix ν bins to absolute κ edges from a reference set (e.g. the simulations).

    Returns a copy of ``config`` whose ``sigma_ref`` holds, per smoothing scale, the standard deviation
    of all pixels of the reference maps after the config's noise, smoothing and border cut.  Summarize
    simulations and mocks with the returned config: both are then binned with the same κ edges (ν edges
    times the reference σ), whatever the mocks' own variance.
    """
    cfg = SummaryConfig.from_dict(config)
    if cfg.bin_units != "nu":
        raise ValueError("config.bin_units: with_reference_sigma needs 'nu' bins")
    probe = dataclasses.replace(cfg, statistics=("moments",), sigma_ref=None, bin_units="kappa")
    if isinstance(reference_maps, (np.ndarray, torch.Tensor)) and reference_maps.ndim == 4:
        if reference_maps.shape[1] > 1:
            raise ValueError(
                "reference_maps: one σ per scale cannot serve several channels; measure each channel "
                "with its own config, or use bin_units='kappa'"
            )
    res = summarize(reference_maps, probe, generator=generator)
    sig = []
    for s in cfg.smoothing_arcmin:
        r = res[f"moments@{scale_label(s)}"]
        m = (r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)).reshape(-1, 4)
        # pooled variance over all maps (equal pixel counts): within-map variance + spread of the means
        var = m[:, 1].mean() + m[:, 0].var()
        if not var > 0:
            raise ValueError(f"reference_maps: zero variance at smoothing scale {s} arcmin")
        sig.append(float(np.sqrt(var)))
    return dataclasses.replace(cfg, sigma_ref=tuple(sig))


__all__ = ["STATISTICS", "SummaryConfig", "kappa_edges", "summarize", "summary_bins", "with_reference_sigma"]
