"""``python -m lensflow.ingest``: external κ maps into a map store.

Inputs (``input``: a folder, a glob pattern, a file, or a list of them):

* **flat FITS maps** (``.fits``, ``.fit``, ``.fits.gz``, ...), one map [H, W], a channel cube [C, H, W] or
  a cube of maps [N, C, H, W] per file (:mod:`lensflow.fitsio`). Pixel scale from ``ANGLE`` (map side in
  degrees, the Columbia lensing / MassiveNuS convention) or the WCS ``CDELT1/2`` / ``CD`` matrix;
  ``pixel_arcmin`` fills in for headers without one. Cosmological parameters from header keys when
  present (``H0``, ``OMEGA_M``/``OM``, ``SIGMA_8``/``SI8``, ``M_NU``/``MNV``, ...) become ``/params``.
  Every map is its own realization.
* **HEALPix maps** (FITS binary tables with ``PIXTYPE = 'HEALPIX'`` read by healpy, or ``.npy``/``.npz``
  arrays of 12 nside² pixels), cut into non-overlapping ``healpix.npix`` x ``healpix.npix`` gnomonic
  patches of ``pixel_arcmin`` (:func:`lensflow.sims.fullsky.cut_patches`). The patches of one input map
  share a realization id, so they never straddle train/val/test. ``hp.UNSEEN`` pixels are a mask:
  patches touching it are dropped.
* **NumPy arrays** (``.npy``, or ``.npz`` with ``npy.key``): [H, W], [N, H, W] or [N, C, H, W] flat maps
  of ``pixel_arcmin``; an ``.npz`` may carry ``params`` [N, P] with ``param_names`` [P].

Everything is checked before the store is written (shapes, pixel scales, parameter names and source
redshifts must agree across files; no NaN values), and a bad file is named in a one-line error. The
store is written atomically, so an error leaves nothing at ``out``. Exit status 0 on success, 2 on bad
input.
"""

from __future__ import annotations

import glob
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lensflow.cli import hydra_cli
from lensflow.fitsio import FitsMapError, is_healpix_fits, read_fits
from lensflow.mapstore import MapStoreWriter, StoreMeta
from lensflow.provenance import provenance

FORMATS: tuple[str, ...] = ("auto", "fits", "healpix", "npy")
FITS_SUFFIXES: tuple[str, ...] = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")
NPY_SUFFIXES: tuple[str, ...] = (".npy", ".npz")


class IngestError(ValueError):
    """An input file is missing, unreadable or inconsistent. The message names the file."""


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


# --------------------------------------------------------------------------------------------
# Per-file inspection (headers / shapes only) and loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
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


def _inspect(path: Path, fmt: str, cfg: Mapping[str, Any]) -> _Item:
    suf = _suffix(path)
    npy_key = (cfg.get("npy") or {}).get("key")
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
            return _Item(path, "healpix", (1, shp[0]) if len(shp) == 1 else shp, key=key)
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
        return _Item(path, "npy", shp, params=params, key=key)
    if suf not in FITS_SUFFIXES and fmt == "auto":
        raise IngestError(f"{path}: unknown file type {suf!r}; expected FITS (.fits) or NumPy (.npy/.npz)")
    try:
        hp_file = is_healpix_fits(path)
    except FitsMapError as e:
        raise IngestError(str(e)) from None
    if fmt == "healpix" or (fmt == "auto" and hp_file):
        if not hp_file:
            raise IngestError(f"{path}: not a HEALPix FITS map (no PIXTYPE = 'HEALPIX')")
        return _inspect_healpix_fits(path, cfg)
    if fmt == "npy":
        raise IngestError(f"{path}: a FITS file, but format=npy")
    try:
        fm = read_fits(path, data=False)
    except FitsMapError as e:
        raise IngestError(str(e)) from None
    return _Item(path, "fits", fm.shape, pixel_arcmin=fm.pixel_arcmin, params=fm.params, z_source=fm.z_source)


def _fields(cfg: Mapping[str, Any]) -> list[int]:
    f = (cfg.get("healpix") or {}).get("field", 0)
    f = [f] if isinstance(f, int) else list(f)
    if not f or not all(isinstance(x, int) and x >= 0 for x in f):
        raise IngestError(f"healpix.field must be a column index or a list of them, got {f!r}")
    return f


def _inspect_healpix_fits(path: Path, cfg: Mapping[str, Any]) -> _Item:
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        hdu = next((h for h in hdul[1:] if "NSIDE" in h.header or "TFIELDS" in h.header), None)
        if hdu is None:
            raise IngestError(f"{path}: HEALPix FITS file without a binary table")
        hdr = hdu.header
        nside = int(hdr.get("NSIDE", 0))
        nfields = int(hdr.get("TFIELDS", 1))
    fields = _fields(cfg)
    if max(fields) >= nfields:
        raise IngestError(f"{path}: healpix.field {max(fields)} out of range; the table has {nfields} columns")
    return _Item(path, "healpix", (len(fields), 12 * nside * nside if nside else -1))


def _load_flat(it: _Item, cfg: Mapping[str, Any]) -> np.ndarray:
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


def _load_healpix(it: _Item, cfg: Mapping[str, Any]) -> np.ndarray:
    if _suffix(it.path) in NPY_SUFFIXES:
        arr, _, _ = _np_open(it.path, it.key)
        m = np.asarray(arr, dtype=np.float64).reshape(it.shape)
        nest = bool((cfg.get("healpix") or {}).get("nest") or False)
        if nest:
            import healpy as hp

            m = np.stack([hp.reorder(x, n2r=True) for x in m])
        return m
    import healpy as hp

    try:
        m = hp.read_map(str(it.path), field=tuple(_fields(cfg)), nest=False, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - healpy/astropy raise many types for broken files
        raise IngestError(f"{it.path}: cannot read the HEALPix map ({e.__class__.__name__}: {str(e)[:100]})") from None
    return np.atleast_2d(m)


# --------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------


def _consistent(items: list[_Item], cfg: Mapping[str, Any]) -> tuple[str, int, int, float, list[float], list[str]]:
    """Check the inputs agree; returns (format, channels, npix, pixel_arcmin, z_source, param names)."""
    fmts = {it.fmt for it in items}
    if len(fmts) > 1:
        odd = next(it for it in items if it.fmt != items[0].fmt)
        raise IngestError(
            f"{odd.path}: is a {odd.fmt} input but {items[0].path} is {items[0].fmt}; ingest one kind at a time"
        )
    fmt = items[0].fmt
    cfg_pix = cfg.get("pixel_arcmin")
    if cfg_pix is not None and not (isinstance(cfg_pix, (int, float)) and cfg_pix > 0):
        raise IngestError(f"pixel_arcmin must be a positive number, got {cfg_pix!r}")
    first = items[0]
    if fmt == "healpix":
        hp_cfg = cfg.get("healpix") or {}
        npix = hp_cfg.get("npix")
        if not isinstance(npix, int) or npix < 2:
            raise IngestError(f"healpix.npix (patch side in pixels) must be an integer >= 2, got {npix!r}")
        if cfg_pix is None:
            raise IngestError("pixel_arcmin: give the patch pixel side in arcmin for HEALPix inputs")
        for it in items:
            if it.shape[1] != first.shape[1] and first.shape[1] > 0:
                raise IngestError(f"{it.path}: {it.shape[1]} HEALPix pixels, but {first.path} has {first.shape[1]}")
            if it.shape[0] != first.shape[0]:
                raise IngestError(f"{it.path}: {it.shape[0]} channels, but {first.path} has {first.shape[0]}")
        channels, pix, names = first.shape[0], float(cfg_pix), []
    else:
        for it in items:
            if it.shape[1:] != first.shape[1:]:
                raise IngestError(
                    f"{it.path}: maps of shape {list(it.shape[1:])} [C, H, W], but {first.path} has "
                    f"{list(first.shape[1:])}"
                )
        channels, npix = first.shape[1], first.shape[2]
        pix = None
        for it in items:
            p = it.pixel_arcmin
            if p is None:
                if cfg_pix is None:
                    raise IngestError(
                        f"{it.path}: no pixel scale (header ANGLE or CDELT1/2); give pixel_arcmin=<arcmin>"
                    )
                p = float(cfg_pix)
            elif cfg_pix is not None and not math.isclose(p, float(cfg_pix), rel_tol=1e-4):
                raise IngestError(f"{it.path}: header pixel scale {p:.6g} arcmin contradicts pixel_arcmin={cfg_pix}")
            if pix is None:
                pix = p
            elif not math.isclose(p, pix, rel_tol=1e-4):
                raise IngestError(f"{it.path}: pixel scale {p:.6g} arcmin, but {first.path} has {pix:.6g}")
        assert pix is not None
        names = sorted(first.params)
        for it in items:
            if sorted(it.params) != names:
                raise IngestError(f"{it.path}: parameters {sorted(it.params)} differ from {names} in {first.path}")
    # source redshifts: config, else headers (must agree), else NaN
    zcfg = cfg.get("z_source")
    if zcfg is not None:
        zs = [float(z) for z in (zcfg if isinstance(zcfg, (list, tuple)) else [zcfg])]
        if len(zs) != channels:
            raise IngestError(f"z_source has {len(zs)} values for {channels} channels")
    else:
        zs = first.z_source if first.z_source is not None else [float("nan")] * channels
        for it in items:
            other = it.z_source if it.z_source is not None else [float("nan")] * channels
            if not np.allclose(other, zs, rtol=1e-6, equal_nan=True):
                raise IngestError(
                    f"{it.path}: source redshift {other} differs from {zs} in {first.path}; set z_source to override"
                )
    npix_out = int((cfg.get("healpix") or {}).get("npix")) if fmt == "healpix" else int(first.shape[2])
    return fmt, channels, npix_out, float(pix), zs, names


def _fixed_params(cfg: Mapping[str, Any]) -> dict[str, float]:
    p = cfg.get("params") or {}
    if not isinstance(p, Mapping):
        raise IngestError(f"params must be a mapping name -> value, got {p!r}")
    out = {}
    for k, v in p.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise IngestError(f"params.{k} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out


def ingest(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Ingest the configured inputs (``conf/ingest.yaml``) into the map store ``cfg.out``; returns its path."""
    c = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    assert isinstance(c, dict)
    fmt_req = c.get("format", "auto")
    if fmt_req not in FORMATS:
        raise IngestError(f"format must be one of {FORMATS}, got {fmt_req!r}")
    if c.get("input") in (None, "", "???"):
        raise IngestError("input: give a folder, a glob pattern or files to ingest")
    out = c.get("out")
    if not out:
        raise IngestError("out: give the path of the map store to write")
    out = Path(str(out))
    overwrite = bool(c.get("overwrite", False))
    if out.exists() and not overwrite:
        raise IngestError(f"out: {out} exists; pass overwrite=true to replace it")
    files = expand_inputs(c["input"])
    if any(f.resolve() == out.resolve() for f in files):
        raise IngestError(f"out: {out} is also an input")
    items = [_inspect(f, fmt_req, c) for f in files]
    fmt, channels, npix, pix, zs, header_names = _consistent(items, c)
    fixed = _fixed_params(c)
    names = tuple(header_names) + tuple(k for k in fixed if k not in header_names)
    hp_cfg = c.get("healpix") or {}
    split = c.get("split") or {}
    kind = c.get("kind", "simulation")
    meta = StoreMeta(
        pixel_arcmin=pix,
        source_redshifts=tuple(zs),
        periodic=bool(c.get("periodic", False)),
        kind=kind,
        param_names=names,
        created_by=provenance(c),
        extra={
            "ingest": {
                "format": fmt,
                "n_files": len(files),
                "files": [str(f) for f in files[:100]],
                "fixed_params": fixed,
            }
        },
    )
    from tqdm.auto import tqdm

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rid = 0
        for it in items:
            if fmt == "healpix":
                from lensflow.sims.fullsky import cut_patches

                m = _load_healpix(it, c)
                try:
                    patches = cut_patches(
                        m,
                        npix,
                        pix,
                        interpolation=str(hp_cfg.get("interpolation", "bilinear")),
                        lon_offset_deg=float(hp_cfg.get("lon_offset_deg", 0.0)),
                        max_patches=hp_cfg.get("max_patches"),
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
                k = _load_flat(it, c)
                n = k.shape[0]
                p = {**it.params, **{nm: np.full(n, v) for nm, v in fixed.items()}}
                yield k, _param_array(p, names, n), np.arange(rid, rid + n)
                rid += n

    with (
        MapStoreWriter(
            out,
            meta,
            npix=npix,
            overwrite=overwrite,
            compression=c.get("compression"),
            fractions=tuple(split.get("fractions", (0.8, 0.1, 0.1))),
            split_seed=int(split.get("seed", 0)),
        ) as w,
        tqdm(total=len(items), unit="file", disable=not c.get("progress", True), desc="ingest", file=sys.stderr) as bar,
    ):
        for k, p, r in batches():
            w.append(k, p if names else None, realization=r)
            bar.update(1)
    return out


def _param_array(p: Mapping[str, np.ndarray], names: Sequence[str], n: int) -> np.ndarray:
    return np.stack([np.asarray(p[nm], dtype=np.float32) for nm in names], axis=1) if names else np.zeros((n, 0))


main = hydra_cli("ingest", ingest)
main.__doc__ = "``python -m lensflow.ingest input=... out=... [key=value ...]``: exit 0 done, 2 bad input."


if __name__ == "__main__":
    main()
