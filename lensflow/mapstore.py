"""HDF5 map stores: the one on-disk format for simulations, ingested suites and mocks.

This module is the only code in lensflow that reads or writes map stores.

Schema (``schema_version`` 1)
-----------------------------
::

    ``/kappa``        float32 ``[N, C, H, W]`` convergence κ (dimensionless), ``H == W``;
                      chunked one map per chunk, optionally compressed (gzip or lzf).
    ``/params``       float32 ``[N, P]`` parameters per map (e.g. Omega_m, sigma_8); ``P`` may be 0.
                      Attr ``param_names``: JSON list of ``P`` names.
    ``/split``        uint8 ``[N]``: 0 = train, 1 = val, 2 = test. Attr ``names``.
    ``/realization``  int64 ``[N]``: id of the independent realization a map comes from. Patches cut
                      from one full-sky map share an id, and the split is assigned per id, so train,
                      val and test never share a realization.

Root attributes: ``schema_version`` (int), ``kind`` (``simulation`` | ``mock``), ``pixel_arcmin``
(float, pixel side in arcmin), ``source_redshifts`` (float array, one per channel; NaN where a
channel is an n(z) bin without a single plane), ``periodic`` (bool: maps are periodic tiles),
``created_by`` (JSON: command, resolved config, versions), ``lensflow_version``, and any extra
JSON attributes under ``meta.extra`` (stored as ``extra`` JSON).

Writers stream (memory constant in N) into a temporary file beside the target and rename it into
place on success, so an exception or a kill never leaves a half-written store at the target path.
Readers validate the schema on open and every map on read, and raise :class:`MapStoreError` with
one line naming the file and the problem.

One file on purpose (about 600 lines): the schema has one owner, and its writer and reader sit side by
side so that what is written and what is checked on reading cannot drift apart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lensflow import __version__
from lensflow._util.atomic import ensure_free_space, replace_into_place, temp_beside
from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain

log = get_logger(__name__)

#: h5py files whose write failed: HDF5 cannot close them (h5py 3.16 / HDF5 2.0 crash on it), so they are kept
#: open, unreferenced by nothing else, until the process ends; :func:`hdf5_broken` tells the command wrapper to
#: end with ``os._exit`` (which skips HDF5's own crashing clean-up) after its error line.
_BROKEN: list[Any] = []


def _park(f: Any) -> None:
    """Keep ``f`` (an h5py file HDF5 failed to write) open until the process ends, and silence the errors h5py
    reports, as "Exception ignored", when its datasets are freed: the command's one error line says it all."""
    if not _BROKEN:
        previous = sys.unraisablehook

        def hook(u: Any) -> None:
            if "h5py" not in str(u.object):
                previous(u)

        sys.unraisablehook = hook
    _BROKEN.append(f)


def hdf5_broken() -> bool:
    """Whether a store write failed inside HDF5 in this process (see :data:`_BROKEN`)."""
    return bool(_BROKEN)


SCHEMA_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
KINDS: tuple[str, ...] = ("simulation", "mock")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


class MapStoreError(ValueError):
    """A map store is missing, malformed or holds bad values. The message names the file."""


@dataclass(frozen=True)
class StoreMeta:
    """Store-level metadata.

    Attributes:
        pixel_arcmin: pixel side in arcmin.
        source_redshifts: one source redshift per channel (NaN for an n(z) bin).
        periodic: whether maps are periodic tiles (no border effects).
        kind: ``"simulation"`` or ``"mock"``.
        param_names: names of the per-map parameters in ``/params``.
        created_by: provenance record (see :func:`lensflow.provenance.provenance`).
        extra: further JSON-serialisable metadata (cosmology, mock provenance, ...).
    """

    pixel_arcmin: float
    source_redshifts: tuple[float, ...]
    periodic: bool = False
    kind: str = "simulation"
    param_names: tuple[str, ...] = ()
    created_by: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (
            isinstance(self.pixel_arcmin, (int, float)) and math.isfinite(self.pixel_arcmin) and self.pixel_arcmin > 0
        ):
            raise ValueError(f"pixel_arcmin must be a positive number, got {self.pixel_arcmin!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "source_redshifts", tuple(float(z) for z in self.source_redshifts))
        object.__setattr__(self, "param_names", tuple(str(p) for p in self.param_names))
        if len(set(self.param_names)) != len(self.param_names):
            raise ValueError(f"param_names must be unique, got {list(self.param_names)}")

    @property
    def channels(self) -> int:
        return len(self.source_redshifts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (checkpoints, ``job.json``); NaN redshifts (n(z) bins) become ``None``.

        :meth:`from_dict` is its inverse.
        """
        from lensflow._util.plain import to_plain

        return {
            "pixel_arcmin": float(self.pixel_arcmin),
            "source_redshifts": [None if math.isnan(z) else float(z) for z in self.source_redshifts],
            "periodic": bool(self.periodic),
            "kind": str(self.kind),
            "param_names": list(self.param_names),
            "created_by": to_plain(dict(self.created_by)),
            "extra": to_plain(dict(self.extra)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreMeta:
        """The :class:`StoreMeta` of a :meth:`to_dict` record; unknown keys are refused (one line)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"StoreMeta: unknown keys {unknown}")
        if "pixel_arcmin" not in d or "source_redshifts" not in d:
            raise ValueError("StoreMeta: needs pixel_arcmin and source_redshifts")
        zs = tuple(float("nan") if z is None else float(z) for z in d["source_redshifts"])
        return cls(
            pixel_arcmin=float(d["pixel_arcmin"]),
            source_redshifts=zs,
            periodic=bool(d.get("periodic", False)),
            kind=str(d.get("kind", "simulation")),
            param_names=tuple(d.get("param_names", ())),
            created_by=dict(d.get("created_by") or {}),
            extra=dict(d.get("extra") or {}),
        )


# --------------------------------------------------------------------------------------------
# Split assignment
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: a fast, platform-independent integer hash."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_splits(
    realization: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) assigned per realization id by a seeded hash.

    Maps that share a realization id always land in the same split, and a map's split does not
    depend on how many maps the store holds, so appending maps never moves existing ones.
    """
    frac = np.asarray(fractions, dtype=float)
    if frac.shape != (3,) or np.any(frac < 0) or not np.isclose(frac.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rid = np.asarray(realization, dtype=np.int64)
    with np.errstate(over="ignore"):
        key = rid.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.int64))[0]
    u = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(frac)[:2]
    return np.searchsorted(edges, u, side="right").astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class MapStoreWriter:
    """Streaming, atomic writer of one map store.

    Use as a context manager; maps are appended in batches and the file appears at ``path`` only
    when the block exits without an exception::

        with MapStoreWriter("sims.h5", meta, npix=128) as w:
            for batch in batches:
                w.append(batch, params=p, realization=ids)

    Split codes default to :func:`assign_splits` of the realization ids (which default to the
    running map index) with ``fractions`` and ``split_seed``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: StoreMeta,
        *,
        npix: int,
        overwrite: bool = False,
        compression: str | None = None,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        split_seed: int = 0,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path}: output exists; pass overwrite=true to replace it")
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path}: output path is a directory")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        if int(npix) < 1:
            raise ValueError(f"npix must be positive, got {npix}")
        assign_splits([0], fractions, split_seed)  # validates fractions up front
        self.meta = meta
        self.npix = int(npix)
        self.channels = meta.channels
        if self.channels < 1:
            raise ValueError("source_redshifts must name at least one channel")
        self._fractions = tuple(fractions)
        self._split_seed = int(split_seed)
        self._n = 0
        self._overwrite = bool(overwrite)
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        # One writer per target (a concurrent run is refused in one line); re-entrant for a job holding it.
        self._lock: contextlib.ExitStack | None = contextlib.ExitStack()
        self._lock.enter_context(target_lock(self.path))
        try:
            if self.path.exists() and not overwrite:  # again, now that no other run can be writing it
                raise FileExistsError(f"{self.path}: output exists; pass overwrite=true to replace it")
            self._tmp = temp_beside(self.path)  # mode 0600 until commit gives it the umask's mode
            self._file = h5py.File(self._tmp, "w")
        except BaseException:
            self._release()
            raise
        c, n = self.channels, self.npix
        P = len(meta.param_names)
        f = self._file
        f.create_dataset(
            "kappa",
            shape=(0, c, n, n),
            maxshape=(None, c, n, n),
            dtype="f4",
            chunks=(1, c, n, n),
            compression=compression,
        )
        f.create_dataset(
            "params",
            shape=(0, P),
            maxshape=(None, P),
            dtype="f4",
            chunks=(max(1, 4096 // max(P, 1)), max(P, 1)) if P else None,
        )
        f.create_dataset("split", shape=(0,), maxshape=(None,), dtype="u1", chunks=(4096,))
        f.create_dataset("realization", shape=(0,), maxshape=(None,), dtype="i8", chunks=(4096,))
        f["params"].attrs["param_names"] = json.dumps(list(meta.param_names))
        f["split"].attrs["names"] = json.dumps(list(SPLITS))
        _write_root_attrs(f, meta)

    @property
    def n(self) -> int:
        """Maps written so far."""
        return self._n

    def append(
        self,
        kappa: np.ndarray,
        params: np.ndarray | None = None,
        realization: np.ndarray | Sequence[int] | None = None,
        split: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Append a batch ``kappa`` [B, C, H, W] (or [B, H, W] for one channel) of finite maps."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        k = np.asarray(kappa, dtype=np.float32)
        if k.ndim == 3 and self.channels == 1:
            k = k[:, None]
        if k.ndim != 4 or k.shape[1:] != (self.channels, self.npix, self.npix):
            raise ValueError(
                f"{self.path}: kappa batch has shape {k.shape}, expected [B, {self.channels}, {self.npix}, {self.npix}]"
            )
        B = k.shape[0]
        bad = ~np.isfinite(k).reshape(B, -1).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{self.path}: kappa map {self._n + int(np.argmax(bad))} has NaN or Inf values; refusing to write it"
            )
        P = len(self.meta.param_names)
        if params is None:
            if P:
                raise ValueError(f"{self.path}: params missing for param_names {list(self.meta.param_names)}")
            p = np.zeros((B, 0), np.float32)
        else:
            p = np.asarray(params, dtype=np.float32).reshape(B, -1) if B else np.zeros((0, P), np.float32)
            if p.shape != (B, P):
                raise ValueError(f"{self.path}: params batch has shape {p.shape}, expected [{B}, {P}]")
            if not np.isfinite(p).all():
                raise ValueError(f"{self.path}: params have NaN or Inf values")
        rid = (
            np.arange(self._n, self._n + B, dtype=np.int64)
            if realization is None
            else np.asarray(realization, dtype=np.int64).reshape(-1)
        )
        if rid.shape != (B,):
            raise ValueError(f"{self.path}: realization has {rid.shape[0]} ids for {B} maps")
        if split is None:
            s = assign_splits(rid, self._fractions, self._split_seed)
        else:
            s = _split_codes(split, B, self.path)
        f = self._file
        lo, hi = self._n, self._n + B
        ensure_free_space(self.path, k.nbytes + p.nbytes + 9 * B)
        try:
            for name, arr in (("kappa", k), ("params", p), ("split", s), ("realization", rid)):
                f[name].resize(hi, axis=0)
                f[name][lo:hi] = arr
        except (OSError, RuntimeError) as e:
            raise self._broken(e) from None
        self._n = hi

    def _broken(self, e: BaseException) -> OSError:
        """The one-line error to raise for a failed write. A file HDF5 itself failed to write is parked (see
        :data:`_BROKEN`); one whose write failed above HDF5 (HDF5 saw nothing) is left to :meth:`abort`."""
        if self._file is not None and ("write failed" in str(e) or "Driver write" in str(e)):
            _park(self._file)
            self._file = None
        code = getattr(e, "errno", None) or errno.EIO
        return OSError(code, f"{self.path}: writing failed: {os.strerror(code)}; nothing was written under this name")

    def commit(self) -> Path:
        """Finish the file and move it into place atomically; returns the final path."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        if self._n == 0:
            self.abort()
            raise ValueError(f"{self.path}: no maps were written; refusing to create an empty store")
        try:
            ensure_free_space(self.path)
            try:
                self._file.attrs["n_maps"] = self._n
                self._file.close()
            except (OSError, RuntimeError) as e:
                raise self._broken(e) from None
            self._file = None
            replace_into_place(self._tmp, self.path, overwrite=self._overwrite)
        except BaseException:
            self.abort()
            raise
        self._release()
        return self.path

    def abort(self) -> None:
        """Drop everything written; the target path is left as it was.

        After a failed write (a full disk) HDF5 still holds unflushed metadata and retries the write on close, and
        an h5py file that failed to close crashes the interpreter at exit: the temporary is truncated first (which
        frees the space that flush needs), then closed, then removed.
        """
        f, self._file = self._file, None
        if f is not None and self._tmp is not None:
            with contextlib.suppress(OSError):
                os.truncate(self._tmp, 0)
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - the temporary is removed either way
                log.debug("%s: closing the temporary after an error failed: %s", self.path, e)
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()

    def __enter__(self) -> MapStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:  # a writer dropped without commit leaves no temp file behind
        try:
            if getattr(self, "_file", None) is not None or getattr(self, "_lock", None) is not None:
                self.abort()
        except Exception:  # noqa: BLE001
            pass


def _split_codes(split: Any, B: int, path: Path) -> np.ndarray:
    arr = np.asarray(split)
    if arr.dtype.kind in "US":
        lookup = {name: i for i, name in enumerate(SPLITS)}
        try:
            arr = np.array([lookup[str(x)] for x in arr.reshape(-1)], dtype=np.uint8)
        except KeyError as e:
            raise ValueError(f"{path}: unknown split name {e.args[0]!r}; expected one of {SPLITS}") from None
    arr = arr.astype(np.int64).reshape(-1)
    if arr.shape != (B,) or arr.min(initial=0) < 0 or arr.max(initial=0) > 2:
        raise ValueError(f"{path}: split must hold {B} codes in 0..2 or names {SPLITS}")
    return arr.astype(np.uint8)


def _write_root_attrs(f: h5py.File, meta: StoreMeta) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["kind"] = meta.kind
    f.attrs["pixel_arcmin"] = float(meta.pixel_arcmin)
    f.attrs["source_redshifts"] = np.asarray(meta.source_redshifts, dtype=np.float64)
    f.attrs["periodic"] = bool(meta.periodic)
    f.attrs["created_by"] = json.dumps(to_plain(dict(meta.created_by)))
    f.attrs["extra"] = json.dumps(to_plain(dict(meta.extra)))
    f.attrs["lensflow_version"] = __version__


def write_store(
    path: str | os.PathLike,
    kappa: np.ndarray,
    meta: StoreMeta,
    *,
    params: np.ndarray | None = None,
    realization: np.ndarray | None = None,
    split: np.ndarray | Sequence[int] | None = None,
    overwrite: bool = False,
    compression: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    batch: int = 256,
) -> Path:
    """Write an in-memory array of maps [N, C, H, W] as one store (atomically)."""
    k = np.asarray(kappa)
    if k.ndim == 3:
        k = k[:, None]
    if k.ndim != 4:
        raise ValueError(f"kappa must be [N, C, H, W], got shape {k.shape}")
    if k.shape[2] != k.shape[3]:
        raise ValueError(f"kappa maps must be square, got {k.shape[2]}x{k.shape[3]}")
    with MapStoreWriter(
        path,
        meta,
        npix=k.shape[-1],
        overwrite=overwrite,
        compression=compression,
        fractions=fractions,
        split_seed=split_seed,
    ) as w:
        for lo in range(0, k.shape[0], batch):
            sl = slice(lo, lo + batch)
            w.append(
                k[sl],
                None if params is None else np.asarray(params)[sl],
                None if realization is None else np.asarray(realization)[sl],
                None if split is None else np.asarray(split)[sl],
            )
    return Path(path)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class MapStore:
    """Read-only, validated view of a map store.

    The HDF5 handle is opened lazily and dropped on pickling, so a store can be handed to
    DataLoader workers: each worker opens its own handle on first access.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        f = self._h5()
        self.meta, self.n = _validate_schema(f, self.path)
        self.channels: int = int(f["kappa"].shape[1])
        self.npix: int = int(f["kappa"].shape[2])
        self._split = f["split"][:] if self.n else np.zeros(0, np.uint8)

    def _h5(self) -> h5py.File:
        if self._file is None:
            if not self.path.exists():
                raise MapStoreError(f"{self.path}: map store not found")
            if self.path.is_dir():
                raise MapStoreError(f"{self.path}: is a directory, not an HDF5 map store")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise MapStoreError(f"{self.path}: not a readable HDF5 file ({e.__class__.__name__})") from None
        return self._file

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.channels, self.npix, self.npix)

    @property
    def split(self) -> np.ndarray:
        """Split codes [N] (0 train, 1 val, 2 test)."""
        return self._split

    def indices(self, split: str | None = None) -> np.ndarray:
        """Map indices of one split (``train``/``val``/``test``), or all maps for ``None``/``all``."""
        if split is None or split == "all":
            return np.arange(self.n)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        return np.flatnonzero(self._split == SPLITS.index(split))

    def read(self, indices: Iterable[int] | slice | np.ndarray | None = None, check_finite: bool = True) -> np.ndarray:
        """κ maps float32 [k, C, H, W] at ``indices`` (any order; all maps for ``None``)."""
        ds = self._h5()["kappa"]
        if indices is None:
            out = ds[:]
            idx = np.arange(self.n)
        elif isinstance(indices, slice):
            out = ds[indices]
            idx = np.arange(self.n)[indices]
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            out = _fancy_read(ds, idx, self.n, self.path)
        if check_finite and out.size:
            bad = ~np.isfinite(out).reshape(out.shape[0], -1).all(axis=1)
            if bad.any():
                raise MapStoreError(f"{self.path}: map {int(idx[np.argmax(bad)])} of 'kappa' has NaN or Inf values")
        return out

    def read_params(self, indices: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
        """Per-map parameters float32 [k, P] in the order of ``meta.param_names``."""
        ds = self._h5()["params"]
        if indices is None:
            return ds[:]
        return _fancy_read(ds, np.asarray(indices, dtype=np.int64).reshape(-1), self.n, self.path)

    def read_realization(self) -> np.ndarray:
        return self._h5()["realization"][:]

    def check_values(self, batch: int = 512) -> None:
        """Scan every map for NaN/Inf (streaming); raises :class:`MapStoreError` on the first bad one."""
        for lo in range(0, self.n, batch):
            self.read(slice(lo, min(lo + batch, self.n)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> MapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles are not picklable; workers reopen lazily
        return state

    def __repr__(self) -> str:
        return (
            f"MapStore({str(self.path)!r}, n={self.n}, channels={self.channels}, npix={self.npix}, "
            f"pixel_arcmin={self.meta.pixel_arcmin}, kind={self.meta.kind!r})"
        )


def _fancy_read(ds: h5py.Dataset, idx: np.ndarray, n: int, path: Path) -> np.ndarray:
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"{path}: map index out of range for a store of {n} maps")
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size == 0:
        return np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
    # h5py wants increasing, unique indices: read sorted unique, then scatter back.
    uniq, inv = np.unique(idx, return_inverse=True)
    if uniq.size > 1 and uniq[-1] - uniq[0] + 1 == uniq.size:
        block = ds[int(uniq[0]) : int(uniq[-1]) + 1]
    else:
        block = ds[uniq]
    return block[inv]


def _validate_schema(f: h5py.File, path: Path) -> tuple[StoreMeta, int]:
    a = f.attrs
    if "schema_version" not in a:
        raise MapStoreError(f"{path}: missing root attribute 'schema_version' (not a lensflow map store)")
    ver = int(a["schema_version"])
    if ver != SCHEMA_VERSION:
        raise MapStoreError(f"{path}: unknown schema_version {ver}; this lensflow reads {SCHEMA_VERSION}")
    for name in ("kappa", "params", "split", "realization"):
        if name not in f:
            raise MapStoreError(f"{path}: missing dataset '{name}'")
    k = f["kappa"]
    if k.ndim != 4:
        raise MapStoreError(f"{path}: dataset 'kappa' has rank {k.ndim}, expected 4 [N, C, H, W]")
    if k.shape[2] != k.shape[3]:
        raise MapStoreError(f"{path}: dataset 'kappa' holds non-square maps {k.shape[2]}x{k.shape[3]}")
    n = int(k.shape[0])
    if "pixel_arcmin" not in a:
        raise MapStoreError(f"{path}: missing root attribute 'pixel_arcmin'")
    pix = float(a["pixel_arcmin"])
    if not (math.isfinite(pix) and pix > 0):
        raise MapStoreError(f"{path}: root attribute 'pixel_arcmin' must be positive, got {pix}")
    zs = np.atleast_1d(np.asarray(a.get("source_redshifts", [np.nan] * k.shape[1]), dtype=float))
    if zs.shape[0] != k.shape[1]:
        raise MapStoreError(f"{path}: 'source_redshifts' has {zs.shape[0]} entries for {k.shape[1]} channels")
    p = f["params"]
    try:
        names = tuple(json.loads(p.attrs.get("param_names", "[]")))
    except (TypeError, json.JSONDecodeError):
        raise MapStoreError(f"{path}: attribute 'param_names' of 'params' is not a JSON list") from None
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] != len(names):
        raise MapStoreError(f"{path}: dataset 'params' has shape {p.shape}, expected [{n}, {len(names)}]")
    for name in ("split", "realization"):
        if f[name].shape != (n,):
            raise MapStoreError(f"{path}: dataset '{name}' has shape {f[name].shape}, expected [{n}]")
    kind = a.get("kind", "simulation")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in KINDS:
        raise MapStoreError(f"{path}: root attribute 'kind' is {kind!r}, expected one of {KINDS}")
    meta = StoreMeta(
        pixel_arcmin=pix,
        source_redshifts=tuple(zs.tolist()),
        periodic=bool(a.get("periodic", False)),
        kind=kind,
        param_names=names,
        created_by=_json_attr(a, "created_by", path),
        extra=_json_attr(a, "extra", path),
    )
    return meta, n


def _json_attr(a: h5py.AttributeManager, name: str, path: Path) -> dict[str, Any]:
    raw = a.get(name, "{}")
    try:
        val = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise MapStoreError(f"{path}: root attribute '{name}' is not valid JSON") from None
    return val if isinstance(val, dict) else {"value": val}


def open_store(path: str | os.PathLike) -> MapStore:
    """Open and validate a map store (schema only; values are checked as maps are read)."""
    return MapStore(path)


def read_maps(
    path: str | os.PathLike,
    split: str | None = None,
    max_maps: int | None = None,
    with_params: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All maps of one split (or the whole store) in memory, optionally with their params."""
    with open_store(path) as st:
        idx = st.indices(split)
        if max_maps is not None:
            if max_maps < 1:
                raise ValueError(f"max_maps must be positive, got {max_maps}")
            idx = idx[:max_maps]
        k = st.read(idx)
        return (k, st.read_params(idx)) if with_params else k


def concat_stores(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    meta: StoreMeta | None = None,
    overwrite: bool = False,
    compression: str | None = None,
    batch: int = 256,
) -> Path:
    """Stream several compatible stores into one (atomically), keeping splits and realization ids."""
    if not inputs:
        raise ValueError("concat_stores needs at least one input store")
    stores = [open_store(p) for p in inputs]
    try:
        first = stores[0]
        for st in stores[1:]:
            if (st.channels, st.npix, st.meta.param_names) != (first.channels, first.npix, first.meta.param_names):
                raise MapStoreError(f"{st.path}: shape or param_names differ from {first.path}")
            if not math.isclose(st.meta.pixel_arcmin, first.meta.pixel_arcmin, rel_tol=1e-6):
                raise MapStoreError(f"{st.path}: pixel_arcmin differs from {first.path}")
        with MapStoreWriter(
            out, meta or first.meta, npix=first.npix, overwrite=overwrite, compression=compression
        ) as w:
            for st in stores:
                rid, sp = st.read_realization(), st.split
                for lo in range(0, st.n, batch):
                    sl = slice(lo, min(lo + batch, st.n))
                    idx = np.arange(st.n)[sl]
                    w.append(st.read(sl), st.read_params(idx), rid[sl], sp[sl])
    finally:
        for st in stores:
            st.close()
    return Path(out)
