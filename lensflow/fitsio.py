"""The FITS convention for flat convergence maps: one place for writing (mocks) and reading (ingest).

A file holds one map: a 2-D image ``[H, W]`` (one channel) or a 3-D cube ``[C, H, W]`` (tomographic
channels) in the first HDU with image data. Maps are square. The header carries::

    ``ANGLE``        side of the map in degrees (the Columbia lensing / MassiveNuS / LensTools convention);
    ``CTYPE1/2``     ``RA---TAN`` / ``DEC--TAN`` gnomonic WCS about ``CRVAL1/2`` (deg), ``CRPIX1/2 = (N+1)/2``,
                     ``CDELT1 = -Δ``, ``CDELT2 = +Δ`` (deg; north up, east left), ``LONPOLE = 180``. This is
                     exactly the geometry of :func:`lensflow.sims.patches.cut_patches`.
    ``Z_SOURCE``     source redshift of a one-channel map; ``ZSRC1 .. ZSRCn`` for a cube (absent for n(z) bins);
    parameters       cosmology and other per-map parameters, see :data:`PARAM_KEYS` (``H0`` in km/s/Mpc holds h).

Reading accepts more: the pixel scale from ``ANGLE`` or, failing that, WCS ``CDELT1/2`` or a ``CD``
matrix (``CUNIT`` deg, arcmin, arcsec or rad); parameters under the common aliases in
:data:`PARAM_ALIASES` (e.g. ``OM``, ``SI8``, ``SIGMA8``, ``MNV``).

Several maps: :func:`write_fits_maps` (one file per map) and :func:`write_mock_fits` (a folder of
files, or one cube ``[N, C, H, W]`` with ``NMAPS`` in the header and a ``PARAMS`` table) -- both read
back by :func:`read_fits`.

Readers raise :class:`FitsMapError` (a ``ValueError``) with one line naming the file and the problem.

One file on purpose (about 550 lines): the header convention is written and read here side by side, so the
writers and the reader cannot disagree about it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.atomic import atomic_dir, atomic_path

#: Header key written for each known parameter name.
PARAM_KEYS: dict[str, str] = {
    "Omega_m": "OMEGA_M",
    "Omega_b": "OMEGA_B",
    "h": "H0",
    "sigma_8": "SIGMA_8",
    "n_s": "N_S",
    "w0": "W0",
    "wa": "WA",
    "m_nu": "M_NU",
    "A_s": "A_S",
    "Omega_L": "OMEGA_L",
    "S_8": "S_8",
}

#: Header keys read for each parameter, in order of preference.
PARAM_ALIASES: dict[str, tuple[str, ...]] = {
    "Omega_m": ("OMEGA_M", "OMEGAM", "OM", "OMEGA_M0", "OM0"),
    "Omega_b": ("OMEGA_B", "OMEGAB", "OB"),
    "h": ("H0", "LITTLEH", "HUBBLE"),
    "sigma_8": ("SIGMA_8", "SIGMA8", "SI8"),
    "n_s": ("N_S", "NS"),
    "w0": ("W0",),
    "wa": ("WA",),
    "m_nu": ("M_NU", "MNU", "MNV", "M_NU_SUM"),
    "A_s": ("A_S", "AS"),
    "Omega_L": ("OMEGA_L", "OMEGAL", "OL"),
    "S_8": ("S_8", "S8"),
}

Z_KEYS: tuple[str, ...] = ("Z_SOURCE", "ZSOURCE", "Z_S", "ZS", "Z", "REDSHIFT")
_UNIT_DEG = {
    "deg": 1.0,
    "degree": 1.0,
    "degrees": 1.0,
    "arcmin": 1 / 60,
    "arcsec": 1 / 3600,
    "rad": 180 / math.pi,
    "": 1.0,
}


class FitsMapError(ValueError):
    """A FITS map file is unreadable or breaks the convention. The message names the file."""


@dataclass
class FitsMaps:
    """Maps read from one FITS file.

    Attributes:
        path: the file.
        kappa: float32 [N, C, H, W] (N = 1 unless the file is a cube of maps); with ``data=False`` an
            empty array of that shape that holds no values.
        pixel_arcmin: pixel side in arcmin, or None when the header gives none.
        params: parameter name -> float64 [N] (header values repeated, or the ``PARAMS`` table).
        z_source: source redshift per channel, or None when absent.
        realization: int64 [N] from a ``PARAMS`` table, or None.
        header: the image header.
    """

    path: Path
    kappa: np.ndarray
    pixel_arcmin: float | None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    z_source: list[float] | None = None
    realization: np.ndarray | None = None
    header: Any = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kappa.shape)  # type: ignore[return-value]


def fits_header(
    npix: int,
    pixel_arcmin: float,
    *,
    channels: int = 1,
    center_deg: tuple[float, float] = (0.0, 0.0),
    z_source: Sequence[float] | float | None = None,
    params: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
):
    """The lensflow FITS header (see module docstring) of an ``npix x npix`` map with ``channels`` channels."""
    from astropy.io import fits

    if not (pixel_arcmin > 0 and math.isfinite(pixel_arcmin)):
        raise ValueError(f"pixel_arcmin must be positive, got {pixel_arcmin!r}")
    h = fits.Header()
    d = float(pixel_arcmin) / 60.0
    h["ANGLE"] = (npix * d, "map side [deg]")
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN", "gnomonic"), ("DEC--TAN", "gnomonic")
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRPIX1"] = h["CRPIX2"] = (npix + 1) / 2.0
    h["CRVAL1"], h["CRVAL2"] = float(center_deg[0]), float(center_deg[1])
    h["CDELT1"], h["CDELT2"] = (-d, "pixel side [deg], east left"), (d, "pixel side [deg]")
    h["LONPOLE"] = 180.0
    h["BUNIT"] = ("", "convergence kappa (dimensionless)")
    if z_source is not None:
        zs = np.atleast_1d(np.asarray(z_source, dtype=float))
        if zs.size != channels:
            raise ValueError(f"z_source has {zs.size} values for {channels} channels")
        if channels == 1:
            if math.isfinite(zs[0]):
                h["Z_SOURCE"] = (float(zs[0]), "source redshift")
        else:
            for i, z in enumerate(zs, 1):
                if math.isfinite(z):
                    h[f"ZSRC{i}"] = (float(z), f"source redshift of channel {i}")
    set_param_cards(h, params or {})
    for k, v in (extra or {}).items():
        h[k] = v
    h["ORIGIN"] = "lensflow"
    return h


def set_param_cards(h: Any, params: Mapping[str, float]) -> None:
    """Write per-map parameters into header ``h`` under :data:`PARAM_KEYS` (else the name, upper case, 8 letters);
    ``h`` goes in as ``H0`` in km/s/Mpc."""
    for name, value in params.items():
        key = PARAM_KEYS.get(name)
        if key is None:
            key = name.upper()[:8]
            if not key.replace("_", "").isalnum():
                raise ValueError(f"parameter name {name!r} cannot be a FITS header key")
        v = float(value)
        h[key] = (100.0 * v, "Hubble constant [km/s/Mpc]") if name == "h" else (v, name)


def _atomic_writeto(hdul: Any, path: Path, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        hdul.writeto(tmp, overwrite=True)


def write_fits_map(
    path: str | os.PathLike,
    kappa: np.ndarray,
    pixel_arcmin: float,
    *,
    z_source: Sequence[float] | float | None = None,
    params: Mapping[str, float] | None = None,
    center_deg: tuple[float, float] = (0.0, 0.0),
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one map [H, W] or [C, H, W] (float32) with the lensflow header, atomically."""
    from astropy.io import fits

    k = np.asarray(kappa, dtype=np.float32)
    if k.ndim not in (2, 3) or k.shape[-1] != k.shape[-2]:
        raise ValueError(f"kappa must be a square map [H, W] or cube [C, H, W], got shape {k.shape}")
    if not np.isfinite(k).all():
        raise ValueError(f"{path}: refusing to write a map with NaN or Inf values")
    channels = 1 if k.ndim == 2 else k.shape[0]
    hdr = fits_header(
        k.shape[-1],
        pixel_arcmin,
        channels=channels,
        center_deg=center_deg,
        z_source=z_source,
        params=params,
        extra=extra,
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_writeto(fits.HDUList([fits.PrimaryHDU(k, header=hdr)]), p, overwrite)
    return p


def write_fits_maps(
    directory: str | os.PathLike,
    maps: np.ndarray,
    pixel_arcmin: float,
    *,
    z_source: Sequence[float] | float | None = None,
    params: np.ndarray | None = None,
    param_names: Sequence[str] = (),
    prefix: str = "kappa",
    start: int = 0,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write maps [N, H, W] or [N, C, H, W] as ``directory/{prefix}_{i:06d}.fits``, one map per file.

    All files are written into a temporary folder first and moved into place only when every one
    succeeded, so an error leaves none of them behind. Returns the paths written.
    """
    m = np.asarray(maps)
    if m.ndim not in (3, 4):
        raise ValueError(f"maps must be [N, H, W] or [N, C, H, W], got shape {m.shape}")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    n = m.shape[0]
    if params is not None:
        params = np.asarray(params, dtype=float).reshape(n, -1)
        if params.shape[1] != len(param_names):
            raise ValueError(f"params has {params.shape[1]} columns for {len(param_names)} param_names")
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / f"{prefix}_{start + i:06d}.fits" for i in range(n)]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t}: exists; pass overwrite=True to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", dir=out_dir))
    try:
        staged = []
        for i in range(n):
            p = None if params is None else dict(zip(param_names, params[i].tolist(), strict=True))
            staged.append(
                write_fits_map(tmp / targets[i].name, m[i], pixel_arcmin, z_source=z_source, params=p, extra=extra)
            )
        for s, t in zip(staged, targets, strict=True):
            os.replace(s, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _open(path: Path):
    from astropy.io import fits

    if not path.exists():
        raise FitsMapError(f"{path}: file not found")
    try:
        return fits.open(path, memmap=False)
    except (OSError, ValueError, TypeError) as e:
        raise FitsMapError(f"{path}: not a readable FITS file ({e.__class__.__name__}: {str(e)[:120]})") from None


def is_healpix_fits(path: str | os.PathLike) -> bool:
    """Whether a FITS file holds a HEALPix map (``PIXTYPE = 'HEALPIX'`` or ``NSIDE`` in a table HDU)."""
    p = Path(path)
    with _open(p) as hdul:
        for hdu in hdul:
            hdr = hdu.header
            if str(hdr.get("PIXTYPE", "")).strip().upper() == "HEALPIX":
                return True
            if "NSIDE" in hdr and str(hdr.get("XTENSION", "")).strip().upper() == "BINTABLE":
                return True
    return False


def _pixel_scale(hdr: Any, npix: int, path: Path) -> float | None:
    """Pixel side in arcmin from ANGLE (map side, deg) or the WCS; None if the header has neither."""
    from_angle = None
    if "ANGLE" in hdr:
        try:
            ang = float(hdr["ANGLE"])
        except (TypeError, ValueError):
            raise FitsMapError(f"{path}: header ANGLE is not a number: {hdr['ANGLE']!r}") from None
        if not (math.isfinite(ang) and ang > 0):
            raise FitsMapError(f"{path}: header ANGLE must be a positive map side in degrees, got {ang}")
        from_angle = ang * 60.0 / npix
    from_wcs = None
    unit = str(hdr.get("CUNIT1", "deg")).strip().lower()
    if unit not in _UNIT_DEG:
        raise FitsMapError(f"{path}: unknown CUNIT1 {unit!r}")
    scale = _UNIT_DEG[unit] * 60.0
    if "CDELT1" in hdr or "CDELT2" in hdr:
        try:
            d1, d2 = abs(float(hdr.get("CDELT1", hdr.get("CDELT2")))), abs(float(hdr.get("CDELT2", hdr.get("CDELT1"))))
        except (TypeError, ValueError):
            raise FitsMapError(f"{path}: header CDELT1/2 are not numbers") from None
        if not (d1 > 0 and d2 > 0):
            raise FitsMapError(f"{path}: header CDELT1/2 must be non-zero, got {d1}, {d2}")
        if not math.isclose(d1, d2, rel_tol=1e-6):
            raise FitsMapError(f"{path}: pixels are not square (|CDELT1| = {d1}, |CDELT2| = {d2})")
        from_wcs = d1 * scale
    elif all(k in hdr for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")):
        cd = np.array([[hdr["CD1_1"], hdr["CD1_2"]], [hdr["CD2_1"], hdr["CD2_2"]]], dtype=float)
        c1, c2 = np.linalg.norm(cd[:, 0]), np.linalg.norm(cd[:, 1])
        if not (c1 > 0 and math.isclose(c1, c2, rel_tol=1e-6) and abs(cd[:, 0] @ cd[:, 1]) < 1e-6 * c1 * c2):
            raise FitsMapError(f"{path}: the CD matrix does not describe square pixels")
        from_wcs = c1 * scale
    if from_angle is not None and from_wcs is not None and not math.isclose(from_angle, from_wcs, rel_tol=1e-4):
        raise FitsMapError(f"{path}: ANGLE gives {from_angle:.6g} arcmin pixels but the WCS gives {from_wcs:.6g}")
    return from_angle if from_angle is not None else from_wcs


def header_params(hdr: Any, path: Path | str = "") -> dict[str, float]:
    """Parameters found in a header under the names/aliases of :data:`PARAM_ALIASES`."""
    out: dict[str, float] = {}
    for name, keys in PARAM_ALIASES.items():
        for key in keys:
            if key in hdr:
                try:
                    v = float(hdr[key])
                except (TypeError, ValueError):
                    raise FitsMapError(f"{path}: header {key} is not a number: {hdr[key]!r}") from None
                if name == "h" and v > 3.0:  # H0 in km/s/Mpc
                    v /= 100.0
                out[name] = v
                break
    return out


def _header_z(hdr: Any, channels: int) -> list[float] | None:
    if channels > 1:
        zs = [hdr.get(f"ZSRC{i}") for i in range(1, channels + 1)]
        return [float(z) for z in zs] if all(z is not None for z in zs) else None
    for key in Z_KEYS:
        if key in hdr:
            try:
                return [float(hdr[key])]
            except (TypeError, ValueError):
                return None
    return None


def read_fits(path: str | os.PathLike, *, data: bool = True) -> FitsMaps:
    """Read the maps of one FITS file: a map [H, W], a cube of channels [C, H, W], or a cube of maps
    [N, C, H, W] (``NMAPS`` in the header; per-map parameters in a ``PARAMS`` table), from the first HDU
    with image data. With ``data=False`` only headers are parsed (no pixel values are read)."""
    p = Path(path)
    with _open(p) as hdul:
        try:
            hdu = next((h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 2), None)
        except (OSError, ValueError) as e:
            raise FitsMapError(f"{p}: not a readable FITS file ({e.__class__.__name__}: {str(e)[:120]})") from None
        if hdu is None:
            raise FitsMapError(f"{p}: no image HDU with a 2-D map")
        hdr = hdu.header
        shape = tuple(int(hdr[f"NAXIS{i}"]) for i in range(hdr["NAXIS"], 0, -1))
        if len(shape) == 4:
            N, C = shape[0], shape[1]
        elif len(shape) == 3 and "NMAPS" in hdr:
            N, C = shape[0], 1
        elif len(shape) == 3:
            N, C = 1, shape[0]
        elif len(shape) == 2:
            N, C = 1, 1
        else:
            raise FitsMapError(f"{p}: image has {len(shape)} axes; expected [H, W], [C, H, W] or [N, C, H, W]")
        H, W = shape[-2], shape[-1]
        if H != W:
            raise FitsMapError(f"{p}: maps are not square ({H}x{W} pixels)")
        if data:
            try:
                arr = np.asarray(hdu.data, dtype=np.float32).reshape(N, C, H, W)
            except (OSError, ValueError, TypeError) as e:
                raise FitsMapError(
                    f"{p}: cannot read the image data ({e.__class__.__name__}: {str(e)[:120]})"
                ) from None
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise FitsMapError(f"{p}: maps have {bad} NaN or Inf pixel values")
        else:
            arr = np.empty((N, C, H, W), dtype=np.float32)
        header = hdr.copy()
        params = {k: np.full(N, v) for k, v in header_params(header, p).items()}
        realization = np.full(N, int(header["REALIZ"]), dtype=np.int64) if "REALIZ" in header else None
        table = next((h for h in hdul if h.name == "PARAMS"), None)
        if table is not None:
            cols = table.columns.names
            if len(table.data) != N:
                raise FitsMapError(f"{p}: PARAMS table has {len(table.data)} rows for {N} maps")
            for name in cols:
                if name.upper() == "REALIZATION":
                    realization = np.asarray(table.data[name], dtype=np.int64)
                else:
                    params[name] = np.asarray(table.data[name], dtype=np.float64)
    return FitsMaps(
        path=p,
        kappa=arr,
        pixel_arcmin=_pixel_scale(header, W, p),
        params=params,
        z_source=_header_z(header, C),
        realization=realization,
        header=header,
    )


def write_mock_fits(
    out: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]],
    meta: Any,
    *,
    layout: str = "files",
    n_total: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write maps streamed as ``(kappa [B, C, H, W], params [B, P] or None, realization [B] or None)``
    batches as FITS, with the metadata of a :class:`lensflow.mapstore.StoreMeta` ``meta``.

    ``layout="files"``: ``out`` is a folder of ``map-NNNNNNNNN.fits`` (map index), one map per file,
    parameters and realization id (``REALIZ``) in each header. ``layout="cube"``: ``out`` is one FITS
    file with the cube [N, C, H, W] (``n_total`` maps, required) in the primary HDU and a ``PARAMS``
    table (one column per parameter, plus ``REALIZATION``). Either way the output appears at ``out``
    only when complete (temporary sibling, then rename), with the umask's permissions.
    """
    if layout not in ("files", "cube"):
        raise ValueError(f"layout must be 'files' or 'cube', got {layout!r}")
    target = Path(out)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target}: exists; pass overwrite=True to replace it")
    if layout == "files":
        return _write_files(target, batches, _MockHeader(meta))
    if n_total is None or n_total < 1:
        raise ValueError("layout='cube' needs n_total, the number of maps")
    return _write_cube(target, batches, _MockHeader(meta), n_total)


class _MockHeader:
    """The header of every mock map of a store's metadata: geometry, source redshifts, ``KIND``."""

    def __init__(self, meta: Any) -> None:
        self.names = tuple(getattr(meta, "param_names", ()))
        self.zs = list(getattr(meta, "source_redshifts", ()))
        self.pix = float(meta.pixel_arcmin)
        self.kind = str(getattr(meta, "kind", "mock"))

    def __call__(self, npix: int, channels: int, params: Sequence[float] | None = None) -> Any:
        p = None if params is None or not self.names else dict(zip(self.names, params, strict=True))
        z = self.zs if len(self.zs) == channels else None
        return fits_header(npix, self.pix, channels=channels, z_source=z, params=p, extra={"KIND": self.kind})


def _as_nchw(kappa: np.ndarray) -> np.ndarray:
    k = np.asarray(kappa, dtype=np.float32)
    return k[:, None] if k.ndim == 3 else k


def _write_files(
    target: Path, batches: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]], header: _MockHeader
) -> Path:
    """``layout="files"``: a folder of one-map files, written into a temporary folder renamed at the end."""
    from astropy.io import fits

    with atomic_dir(target, overwrite=True) as tmp:
        i = 0
        for kappa, params, real in batches:
            k = _as_nchw(kappa)
            for b in range(k.shape[0]):
                row = None if params is None else np.asarray(params)[b].tolist()
                hdr = header(k.shape[-1], k.shape[1], row)
                if real is not None:
                    hdr["REALIZ"] = (int(np.asarray(real)[b]), "realization id")
                hdr["MAPINDEX"] = i
                img = k[b, 0] if k.shape[1] == 1 else k[b]
                if not np.isfinite(img).all():
                    raise ValueError(f"{target}: map {i} has NaN or Inf values; refusing to write it")
                fits.PrimaryHDU(img, header=hdr).writeto(tmp / f"map-{i:09d}.fits")
                i += 1
        if i == 0:
            raise ValueError(f"{target}: no maps to write")
    return target


def _cube_header(header: _MockHeader, k: np.ndarray, n_total: int) -> Any:
    """The primary header of a streamed cube [n_total, C, H, W] whose first batch is ``k``."""
    hdr = header(k.shape[-1], k.shape[1])
    hdr.insert(0, ("SIMPLE", True))
    hdr.insert(1, ("BITPIX", -32))
    hdr.insert(2, ("NAXIS", 4))
    for ax, size in enumerate((k.shape[3], k.shape[2], k.shape[1], n_total), 1):
        hdr.insert(2 + ax, (f"NAXIS{ax}", size))
    hdr.insert(7, ("EXTEND", True))  # the PARAMS table follows
    hdr["NMAPS"] = (n_total, "maps in the cube [N, C, H, W]")
    hdr["NCHAN"] = (k.shape[1], "channels per map")
    return hdr


def _write_cube(
    target: Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]],
    header: _MockHeader,
    n_total: int,
) -> Path:
    """``layout="cube"``: one file, the cube streamed batch by batch, then the ``PARAMS`` table."""
    from astropy.io import fits

    names = header.names
    with atomic_path(target, overwrite=True) as tmpfile:
        stream = None
        done = 0
        pars: list[np.ndarray] = []
        reals: list[np.ndarray] = []
        for kappa, params, real in batches:
            k = _as_nchw(kappa)
            if stream is None:
                hdr = _cube_header(header, k, n_total)
                tmpfile.unlink(missing_ok=True)  # StreamingHDU creates its file
                stream = fits.StreamingHDU(tmpfile, hdr)
            if done + k.shape[0] > n_total:
                raise ValueError(f"{target}: more than n_total={n_total} maps")
            if not np.isfinite(k).all():
                raise ValueError(f"{target}: a map has NaN or Inf values; refusing to write it")
            stream.write(k)
            done += k.shape[0]
            B = k.shape[0]
            pars.append(np.zeros((B, len(names))) if params is None else np.asarray(params, float).reshape(B, -1))
            reals.append(np.arange(done - B, done) if real is None else np.asarray(real, np.int64).reshape(B))
        if stream is None or done != n_total:
            raise ValueError(f"{target}: got {done} maps, expected n_total={n_total}")
        stream.close()
        P = np.concatenate(pars)
        cols = [fits.Column(name=nm, format="D", array=P[:, j]) for j, nm in enumerate(names)]
        cols.append(fits.Column(name="REALIZATION", format="K", array=np.concatenate(reals)))
        table = fits.BinTableHDU.from_columns(cols, name="PARAMS")
        fits.append(tmpfile, table.data, table.header)
    return target
