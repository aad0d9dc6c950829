"""The input files of :mod:`lensflow.ingestion`: find them, inspect their headers, read their maps.

Flat FITS maps (:mod:`lensflow.fitsio`), HEALPix maps (FITS binary tables read by healpy, or ``.npy``/``.npz``
arrays of 12 nside² pixels) and NumPy arrays of flat maps. Errors are :class:`IngestError` lines naming the file.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lensflow.fitsio import FitsMapError, is_healpix_fits, read_fits

__all__ = [
    "FITS_SUFFIXES",
    "NPY_SUFFIXES",
    "HealpixOptions",
    "IngestError",
    "InputFile",
    "expand_inputs",
    "inspect_file",
    "load_flat",
    "load_healpix",
]

FITS_SUFFIXES: tuple[str, ...] = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")
NPY_SUFFIXES: tuple[str, ...] = (".npy", ".npz")


class IngestError(ValueError):
    """An input file is missing, unreadable or inconsistent. The message names the file."""


@dataclass(frozen=True)
class HealpixOptions:
    """``healpix.*`` of ``conf/ingest.yaml``: how HEALPix inputs are read and cut (checked when used)."""

    npix: Any
    field: Any
    nest: bool
    interpolation: str
    max_patches: int | None
    lon_offset_deg: float

    def fields(self) -> list[int]:
        """The table column(s) to read: one per channel."""
        f = [self.field] if isinstance(self.field, int) else list(self.field)
        if not f or not all(isinstance(x, int) and x >= 0 for x in f):
            raise IngestError(f"healpix.field must be a column index or a list of them, got {f!r}")
        return f


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in FITS_SUFFIXES + NPY_SUFFIXES:
        if name.endswith(s):
            return s
    return p.suffix.lower()


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by ``inputs``: folders (their FITS/NumPy files), glob patterns and files, in sorted order."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise IngestError("input: no files given")
    out: list[Path] = []
    for it in items:
        s = str(it)
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _suffix(q) in FITS_SUFFIXES + NPY_SUFFIXES)
            if not found:
                raise IngestError(f"input {s}: folder holds no FITS (.fits) or NumPy (.npy/.npz) files")
            out.extend(found)
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
            if not found:
                raise IngestError(f"input {s}: no files match the pattern")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise IngestError(f"{s}: file not found")
    seen: set[Path] = set()
    uniq = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


@dataclass
class InputFile:
    """One input file as inspected: its format, shape and header metadata."""

    path: Path
    fmt: str  # fits | healpix | npy
    shape: tuple[int, ...]  # flat: (N, C, H, W); healpix: (C, Npix)
    pixel_arcmin: float | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    z_source: list[float] | None = None
    key: str | None = None  # npz array name


def _npz_key(path: Path, names: Sequence[str], key: str | None) -> str:
    if key is not None:
        if key not in names:
            raise IngestError(f"{path}: no array {key!r} in the .npz (it holds {sorted(names)})")
        return key
    arrays = [n for n in names if n not in ("params", "param_names")]
    if "kappa" in arrays:
        return "kappa"
    if len(arrays) == 1:
        return arrays[0]
    raise IngestError(f"{path}: .npz holds several arrays {sorted(arrays)}; choose one with npy.key")


def _np_open(path: Path, key: str | None) -> tuple[np.ndarray, str | None, dict[str, np.ndarray]]:
    try:
        if _suffix(path) == ".npz":
            z = np.load(path, allow_pickle=False)
            k = _npz_key(path, z.files, key)
            arr = z[k]
            params: dict[str, np.ndarray] = {}
            if "params" in z.files:
                if "param_names" not in z.files:
                    raise IngestError(f"{path}: 'params' without 'param_names' in the .npz")
                names = [str(n) for n in z["param_names"].tolist()]
                p = np.asarray(z["params"], dtype=float)
                if p.ndim != 2 or p.shape[1] != len(names):
                    raise IngestError(f"{path}: 'params' has shape {p.shape} for {len(names)} param_names")
                params = {n: p[:, j] for j, n in enumerate(names)}
            return arr, k, params
        return np.load(path, mmap_mode="r", allow_pickle=False), None, {}
    except IngestError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise IngestError(f"{path}: not a readable NumPy file ({e.__class__.__name__}: {str(e)[:100]})") from None


def _healpix_len(n: int) -> bool:
    nside = math.isqrt(n // 12) if n >= 12 else 0
    return nside > 0 and 12 * nside * nside == n and (nside & (nside - 1)) == 0


def inspect_file(path: Path, fmt: str, npy_key: str | None, healpix: HealpixOptions) -> InputFile:
    """Format and shape of one input file (headers only; no pixel values are read)."""
    suf = _suffix(path)
    if suf in NPY_SUFFIXES:
        if fmt not in ("auto", "npy", "healpix"):
            raise IngestError(f"{path}: a NumPy file, but format={fmt}")
        arr, key, params = _np_open(path, npy_key)
        shp = tuple(arr.shape)
        is_hp = (len(shp) == 1 and _healpix_len(shp[0])) or (
            len(shp) == 2 and shp[0] != shp[1] and _healpix_len(shp[1])
        )
        if fmt == "healpix" or (fmt == "auto" and is_hp):
            if not is_hp:
                raise IngestError(f"{path}: array of shape {shp} is not a HEALPix map [12 nside^2] or maps [C, Npix]")
            return InputFile(path, "healpix", (1, shp[0]) if len(shp) == 1 else shp, key=key)
        if len(shp) == 2:
            shp = (1, 1, *shp)
        elif len(shp) == 3:
            shp = (shp[0], 1, shp[1], shp[2])
        if len(shp) != 4:
            raise IngestError(
                f"{path}: array of shape {tuple(arr.shape)} is not maps [H, W], [N, H, W] or [N, C, H, W]"
            )
        if shp[2] != shp[3]:
            raise IngestError(f"{path}: maps are not square ({shp[2]}x{shp[3]} pixels)")
        for n, v in params.items():
            if v.shape[0] != shp[0]:
                raise IngestError(f"{path}: 'params' has {v.shape[0]} rows for {shp[0]} maps ({n})")
        return InputFile(path, "npy", shp, params=params, key=key)
    if suf not in FITS_SUFFIXES and fmt == "auto":
        raise IngestError(f"{path}: unknown file type {suf!r}; expected FITS (.fits) or NumPy (.npy/.npz)")
    try:
        hp_file = is_healpix_fits(path)
    except FitsMapError as e:
        raise IngestError(str(e)) from None
    if fmt == "healpix" or (fmt == "auto" and hp_file):
        if not hp_file:
            raise IngestError(f"{path}: not a HEALPix FITS map (no PIXTYPE = 'HEALPIX')")
        return _inspect_healpix_fits(path, healpix)
    if fmt == "npy":
        raise IngestError(f"{path}: a FITS file, but format=npy")
    try:
        fm = read_fits(path, data=False)
    except FitsMapError as e:
        raise IngestError(str(e)) from None
    return InputFile(path, "fits", fm.shape, pixel_arcmin=fm.pixel_arcmin, params=fm.params, z_source=fm.z_source)


def _inspect_healpix_fits(path: Path, opts: HealpixOptions) -> InputFile:
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        hdu = next((h for h in hdul[1:] if "NSIDE" in h.header or "TFIELDS" in h.header), None)
        if hdu is None:
            raise IngestError(f"{path}: HEALPix FITS file without a binary table")
        hdr = hdu.header
        nside = int(hdr.get("NSIDE", 0))
        nfields = int(hdr.get("TFIELDS", 1))
    fields = opts.fields()
    if max(fields) >= nfields:
        raise IngestError(f"{path}: healpix.field {max(fields)} out of range; the table has {nfields} columns")
    return InputFile(path, "healpix", (len(fields), 12 * nside * nside if nside else -1))


def load_flat(it: InputFile) -> np.ndarray:
    """The flat maps of one input, float32 [N, C, H, W] (finite)."""
    if it.fmt == "fits":
        try:
            return read_fits(it.path).kappa
        except FitsMapError as e:
            raise IngestError(str(e)) from None
    arr, _, _ = _np_open(it.path, it.key)
    a = np.asarray(arr, dtype=np.float32).reshape(it.shape)
    if not np.isfinite(a).all():
        raise IngestError(f"{it.path}: maps have {int((~np.isfinite(a)).sum())} NaN or Inf pixel values")
    return a


def load_healpix(it: InputFile, opts: HealpixOptions) -> np.ndarray:
    """The HEALPix maps of one input, float64 [C, 12 nside²] in RING order."""
    if _suffix(it.path) in NPY_SUFFIXES:
        arr, _, _ = _np_open(it.path, it.key)
        m = np.asarray(arr, dtype=np.float64).reshape(it.shape)
        if bool(opts.nest):
            import healpy as hp

            m = np.stack([hp.reorder(x, n2r=True) for x in m])
        return m
    import healpy as hp

    try:
        m = hp.read_map(str(it.path), field=tuple(opts.fields()), nest=False, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - healpy/astropy raise many types for broken files
        raise IngestError(f"{it.path}: cannot read the HEALPix map ({e.__class__.__name__}: {str(e)[:100]})") from None
    return np.atleast_2d(m)
