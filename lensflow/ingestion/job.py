"""The ingest job: external κ maps (flat FITS, HEALPix, NumPy) checked, then written into one map store.

Everything is checked before the store is written (shapes, pixel scales, parameter names and source redshifts must
agree across files; no NaN values), and a bad file is named in a one-line :class:`IngestError`. The store is
written atomically, so an error leaves nothing at ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.lock import target_lock
from lensflow._util.progress import progress
from lensflow.ingestion.files import IngestError, InputFile, expand_inputs, inspect_file, load_flat, load_healpix
from lensflow.ingestion.request import IngestRequest
from lensflow.mapstore import MapStoreWriter, StoreMeta
from lensflow.provenance import provenance

__all__ = ["ingest"]


def _consistent(items: list[InputFile], job: IngestRequest) -> tuple[str, int, int, float, list[float], list[str]]:
    """Check the inputs agree; returns (format, channels, npix, pixel_arcmin, z_source, param names)."""
    fmts = {it.fmt for it in items}
    if len(fmts) > 1:
        odd = next(it for it in items if it.fmt != items[0].fmt)
        raise IngestError(
            f"{odd.path}: is a {odd.fmt} input but {items[0].path} is {items[0].fmt}; ingest one kind at a time"
        )
    fmt = items[0].fmt
    first = items[0]
    if fmt == "healpix":
        npix = job.healpix.npix
        if not isinstance(npix, int) or npix < 2:
            raise IngestError(f"healpix.npix (patch side in pixels) must be an integer >= 2, got {npix!r}")
        if job.pixel_arcmin is None:
            raise IngestError("pixel_arcmin: give the patch pixel side in arcmin for HEALPix inputs")
        for it in items:
            if it.shape[1] != first.shape[1] and first.shape[1] > 0:
                raise IngestError(f"{it.path}: {it.shape[1]} HEALPix pixels, but {first.path} has {first.shape[1]}")
            if it.shape[0] != first.shape[0]:
                raise IngestError(f"{it.path}: {it.shape[0]} channels, but {first.path} has {first.shape[0]}")
        channels, pix, names = first.shape[0], job.pixel_arcmin, []
    else:
        for it in items:
            if it.shape[1:] != first.shape[1:]:
                raise IngestError(
                    f"{it.path}: maps of shape {list(it.shape[1:])} [C, H, W], but {first.path} has "
                    f"{list(first.shape[1:])}"
                )
        channels, npix = first.shape[1], first.shape[2]
        pix = _flat_pixel_scale(items, job.pixel_arcmin)
        names = sorted(first.params)
        for it in items:
            if sorted(it.params) != names:
                raise IngestError(f"{it.path}: parameters {sorted(it.params)} differ from {names} in {first.path}")
    zs = _source_redshifts(items, job.z_source, channels)
    return fmt, channels, int(npix), float(pix), zs, names


def _flat_pixel_scale(items: list[InputFile], cfg_pix: float | None) -> float:
    """The one pixel scale of flat inputs: headers (which must agree), else ``pixel_arcmin``."""
    first, pix = items[0], None
    for it in items:
        p = it.pixel_arcmin
        if p is None:
            if cfg_pix is None:
                raise IngestError(f"{it.path}: no pixel scale (header ANGLE or CDELT1/2); give pixel_arcmin=<arcmin>")
            p = float(cfg_pix)
        elif cfg_pix is not None and not math.isclose(p, float(cfg_pix), rel_tol=1e-4):
            raise IngestError(f"{it.path}: header pixel scale {p:.6g} arcmin contradicts pixel_arcmin={cfg_pix:g}")
        if pix is None:
            pix = p
        elif not math.isclose(p, pix, rel_tol=1e-4):
            raise IngestError(f"{it.path}: pixel scale {p:.6g} arcmin, but {first.path} has {pix:.6g}")
    assert pix is not None
    return pix


def _source_redshifts(items: list[InputFile], zcfg: Any, channels: int) -> list[float]:
    """Source redshifts: the config's, else the headers' (which must agree), else NaN."""
    if zcfg is not None:
        zs = [float(z) for z in (zcfg if isinstance(zcfg, (list, tuple)) else [zcfg])]
        if len(zs) != channels:
            raise IngestError(f"z_source has {len(zs)} values for {channels} channels")
        return zs
    first = items[0]
    zs = first.z_source if first.z_source is not None else [float("nan")] * channels
    for it in items:
        other = it.z_source if it.z_source is not None else [float("nan")] * channels
        if not np.allclose(other, zs, rtol=1e-6, equal_nan=True):
            raise IngestError(
                f"{it.path}: source redshift {other} differs from {zs} in {first.path}; set z_source to override"
            )
    return zs


def _batches(
    job: IngestRequest, items: list[InputFile], npix: int, pix: float, names: tuple[str, ...]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(maps, params, realization ids) per input file: flat maps as they are, HEALPix maps cut into patches."""
    fixed = job.params
    rid = 0
    for it in items:
        if it.fmt == "healpix":
            from lensflow.sims.patches import cut_patches

            m = load_healpix(it, job.healpix)
            try:
                patches = cut_patches(
                    m,
                    npix,
                    pix,
                    interpolation=str(job.healpix.interpolation),
                    lon_offset_deg=float(job.healpix.lon_offset_deg),
                    max_patches=job.healpix.max_patches,
                    name=str(it.path),
                )
            except ValueError as e:
                raise IngestError(str(e)) from None
            k = patches.maps
            if k.shape[0] == 0:
                raise IngestError(f"{it.path}: no unmasked {npix}x{npix} patch of {pix} arcmin fits in the map")
            n = k.shape[0]
            p = {nm: np.full(n, v) for nm, v in fixed.items()}
            yield k, _param_array(p, names, n), np.full(n, rid)
            rid += 1
        else:
            k = load_flat(it)
            n = k.shape[0]
            p = {**it.params, **{nm: np.full(n, v) for nm, v in fixed.items()}}
            yield k, _param_array(p, names, n), np.arange(rid, rid + n)
            rid += n


def ingest(cfg: IngestRequest | Mapping[str, Any]) -> Path:
    """Ingest the configured inputs (``conf/ingest.yaml``) into the map store ``cfg.out``; returns its path."""
    job = cfg if isinstance(cfg, IngestRequest) else IngestRequest.from_config(cfg)
    with target_lock(job.out):  # one run per output; stale temporaries of killed runs go
        return _ingest(job)


def _ingest(job: IngestRequest) -> Path:
    files = expand_inputs(job.inputs)
    if any(f.resolve() == job.out.resolve() for f in files):
        raise IngestError(f"out: {job.out} is also an input")
    items = [inspect_file(f, job.format, job.npy_key, job.healpix) for f in files]
    fmt, channels, npix, pix, zs, header_names = _consistent(items, job)
    names = tuple(header_names) + tuple(k for k in job.params if k not in header_names)
    meta = StoreMeta(
        pixel_arcmin=pix,
        source_redshifts=tuple(zs),
        periodic=job.periodic,
        kind=job.kind,
        param_names=names,
        created_by=provenance(job.config),
        extra={
            "ingest": {
                "format": fmt,
                "n_files": len(files),
                "files": [str(f) for f in files[:100]],
                "fixed_params": job.params,
            }
        },
    )
    with (
        MapStoreWriter(
            job.out,
            meta,
            npix=npix,
            overwrite=job.overwrite,
            compression=job.compression,
            fractions=job.fractions,
            split_seed=job.split_seed,
        ) as w,
        progress(len(items), unit="file", desc="ingest", enabled=job.progress) as bar,
    ):
        for k, p, r in _batches(job, items, npix, pix, names):
            w.append(k, p if names else None, realization=r)
            bar.update(1)
    return job.out


def _param_array(p: Mapping[str, np.ndarray], names: Sequence[str], n: int) -> np.ndarray:
    return np.stack([np.asarray(p[nm], dtype=np.float32) for nm in names], axis=1) if names else np.zeros((n, 0))
