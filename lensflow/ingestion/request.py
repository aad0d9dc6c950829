"""What ``python -m lensflow.ingest`` is asked to do: the config typed once, at entry.

:data:`DEFAULTS` holds every key's default, for a Python caller's partial config and for the command line alike
(``conf/ingest.yaml`` takes it as the ``lensflow/ingest`` node, :mod:`lensflow.confstore`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensflow._util.checks import check_bool, check_choice
from lensflow._util.plain import merge, to_plain
from lensflow.ingestion.files import HealpixOptions, IngestError
from lensflow.mapstore import DEFAULT_FRACTIONS, KINDS

__all__ = ["DEFAULTS", "FORMATS", "IngestRequest"]

FORMATS: tuple[str, ...] = ("auto", "fits", "healpix", "npy")

#: Every key of an ingest config and its default (the ``lensflow/ingest`` node of ``conf/ingest.yaml``); ``input`` is
#: required.
DEFAULTS: dict[str, Any] = {
    "split": {"fractions": list(DEFAULT_FRACTIONS), "seed": 0},  # train/val/test by realization (conf/split_fractions)
    "input": "???",  # a folder, a glob pattern, a file, or a list of them
    "format": "auto",  # auto | fits (flat FITS maps) | healpix (HEALPix FITS/.npy maps) | npy (flat .npy/.npz maps)
    "out": "data/ingested.h5",
    "overwrite": False,
    # flat maps: for files whose header has no ANGLE/CDELT (must agree with headers that do); .npy maps: required;
    # HEALPix: the patch pixel side (required)
    "pixel_arcmin": None,
    "z_source": None,  # source redshift per channel; null = from headers (Z_SOURCE / ZSRCn), else unknown (NaN)
    "params": None,  # parameters shared by every map, e.g. {Omega_m: 0.3, sigma_8: 0.8}; override header values
    "kind": "simulation",  # simulation | mock
    "periodic": False,  # the maps are periodic tiles
    "healpix": {
        "npix": 128,  # patch side in pixels
        "field": 0,  # table column(s) of HEALPix FITS files; a list gives channels
        "nest": False,  # .npy HEALPix arrays in NESTED order (FITS files say so in their header)
        "interpolation": "bilinear",  # bilinear | nearest
        "max_patches": None,  # patches per input map (layout order: north to south); null = all that fit
        "lon_offset_deg": 0.0,  # rotate the patch layout in longitude
    },
    "npy": {
        "key": None,  # array of an .npz to read; null = 'kappa' or the only array
    },
    "compression": None,  # null | gzip | lzf
    "progress": True,
}


@dataclass(frozen=True)
class IngestRequest:
    """One call of :func:`lensflow.ingestion.ingest`, typed once at entry from ``conf/ingest.yaml``."""

    config: dict[str, Any]  # the complete plain config (provenance)
    inputs: Any
    format: str
    out: Path
    overwrite: bool
    pixel_arcmin: float | None
    z_source: Any
    params: dict[str, float]
    kind: str
    periodic: bool
    healpix: HealpixOptions
    npy_key: str | None
    fractions: tuple[float, ...]
    split_seed: int
    compression: str | None
    progress: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> IngestRequest:
        """From the composed config (or a mapping of its keys; those left out take :data:`DEFAULTS`)."""
        c = to_plain(cfg)
        if not isinstance(c, dict):
            raise IngestError("ingest: config must be a mapping")
        if any(k not in c for k in DEFAULTS):
            c = merge(DEFAULTS, c)
        if c["format"] not in FORMATS:
            raise IngestError(f"format must be one of {FORMATS}, got {c['format']!r}")
        if c["input"] in (None, "", "???"):
            raise IngestError("input: give a folder, a glob pattern or files to ingest")
        if not c["out"]:
            raise IngestError("out: give the path of the map store to write")
        out = Path(str(c["out"]))
        overwrite = check_bool("overwrite", c["overwrite"])
        if out.exists() and not overwrite:
            raise IngestError(f"out: {out} exists; pass overwrite=true to replace it")
        pix = c["pixel_arcmin"]
        if pix is not None and not (isinstance(pix, (int, float)) and pix > 0):
            raise IngestError(f"pixel_arcmin must be a positive number, got {pix!r}")
        return cls(
            config=c,
            inputs=c["input"],
            format=c["format"],
            out=out,
            overwrite=overwrite,
            pixel_arcmin=None if pix is None else float(pix),
            z_source=c["z_source"],
            params=_fixed_params(c["params"]),
            kind=check_choice("kind", c["kind"], KINDS),
            periodic=check_bool("periodic", c["periodic"]),
            healpix=HealpixOptions(**c["healpix"]),
            npy_key=c["npy"]["key"],
            fractions=tuple(c["split"]["fractions"]),
            split_seed=int(c["split"]["seed"]),
            compression=c["compression"],
            progress=bool(c["progress"]),
        )


def _fixed_params(p: Any) -> dict[str, float]:
    p = p or {}
    if not isinstance(p, Mapping):
        raise IngestError(f"params must be a mapping name -> value, got {p!r}")
    out = {}
    for k, v in p.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise IngestError(f"params.{k} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out
