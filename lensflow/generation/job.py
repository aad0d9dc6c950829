"""A generation job on disk: the typed request, ``job.json``, one part per batch, resume, merge (HDF5, FITS).

Work goes into ``<out>.parts/``: ``job.json`` (the resolved request, with the checkpoint's sha256) and one
complete map store per batch, ``part-000000123.h5``, each written atomically. Memory is constant in
``n_maps``. A killed run leaves readable parts and nothing at ``out``; running the same request again skips
the finished batches, and when all exist merges them into ``out`` (atomically) and removes the work folder.
The result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensflow import __version__
from lensflow._util.atomic import write_json
from lensflow._util.checks import check_bool, check_choice, check_int
from lensflow._util.plain import merge, to_plain
from lensflow.generation.sampler import GenerationError, ShapeNoise, check_temperature
from lensflow.generation.streams import STREAMS
from lensflow.mapstore import MapStoreWriter, StoreMeta, open_store
from lensflow.provenance import provenance

__all__ = [
    "DEFAULTS",
    "FITS_LAYOUTS",
    "FORMATS",
    "GenerationRequest",
    "Plan",
    "already_complete",
    "final_meta",
    "merge_parts",
    "prepare_parts",
    "remove_work_folder",
    "scan_parts",
    "write_part",
]

PARTS_SUFFIX = ".parts"
JOB_FILE = "job.json"
PART_NAME = "part-{:09d}.h5"
JOB_FORMAT = 1
FORMATS = ("hdf5", "fits")
FITS_LAYOUTS = ("files", "cube")
COMPRESSIONS = (None, "gzip", "lzf")

#: Every key of a generate config and its default (the ``lensflow/generate`` node of ``conf/generate.yaml``).
DEFAULTS: dict[str, Any] = {
    "ckpt": "???",  # checkpoint of a lensflow Glow model (train's best.ckpt / last.ckpt) or an exported model
    "n_maps": 1000,  # maps per condition (> 0)
    "batch_size": 256,  # maps per forward pass; changes maps only at float32 round-off
    "temperature": 1.0,  # latent temperature (> 0); 1.0 samples the trained distribution
    "seed": 0,  # map i depends only on (seed, i)
    "ema": True,  # sample with the EMA weights (true) or the raw weights (false)
    # Conditions for a conditional model, in physical units: cond.Omega_m=0.3 cond.sigma_8=0.8. A list per name
    # gives a grid (Cartesian product; n_maps per condition; params stored per map): cond.Omega_m=[0.25,0.3,0.35].
    "cond": {},
    # hdf5: the store; fits with fits_layout=files: a folder of map-NNNNNNNNN.fits; cube: one .fits file
    "out": "mocks.h5",
    "format": "hdf5",  # hdf5 | fits
    "fits_layout": "files",  # files (one FITS file per map) | cube (one [N, C, H, W] cube)
    "overwrite": False,  # replace an existing output (and discard an unfinished run of another request)
    "compression": None,  # HDF5 compression of the output: null | gzip | lzf
    "devices": "auto",  # auto (all visible GPUs, or 1 CPU process) | N worker processes
    "accelerator": "auto",  # auto | cpu | cuda
    # Optional shape noise added to every map (off by default: validation adds its own noise). Pixel noise
    # sigma = sigma_e / sqrt(n_gal * pixel_area), one independent stream per map.
    "noise": {
        "sigma_e": None,  # e.g. 0.26 (per-component ellipticity dispersion); null = no noise
        "n_gal": 30.0,  # galaxies per arcmin²
        "seed": None,  # null = the generation seed (its noise streams are independent of the latents)
    },
    "max_attempts": 10,  # draws per map before a map that stays non-finite is an error
    "allow_extrapolation": False,  # conditional models: allow cond outside the training box (recorded in the output)
    "progress": True,  # tqdm progress bar (maps/s)
}


@dataclass(frozen=True)
class GenerationRequest:
    """What ``python -m lensflow.generate`` is asked to do (the fields of ``conf/generate.yaml``).

    Build it with :meth:`from_config` from the composed config or any mapping of these keys (the keys left out
    take :data:`DEFAULTS`): every value is checked there, with one line naming the key, before any file is touched.
    """

    ckpt: Path
    out: Path
    n_maps: int
    batch_size: int
    temperature: float
    seed: int
    ema: bool
    cond: Mapping[str, Any]
    format: str
    fits_layout: str
    overwrite: bool
    compression: str | None
    devices: int | str
    accelerator: str
    noise: ShapeNoise | None
    max_attempts: int
    progress: bool
    allow_extrapolation: bool

    @classmethod
    def from_config(cls, cfg: Any) -> GenerationRequest:
        """The request of a composed ``generate`` config (a ``DictConfig`` or a mapping; keys left out take
        :data:`DEFAULTS`)."""
        given = dict(to_plain(cfg) or {})
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"generate: unknown keys {unknown}")
        noise = given.pop("noise", None)
        if noise is None or isinstance(noise, Mapping):
            noise = merge(DEFAULTS["noise"], noise or {})
        c = merge(DEFAULTS, given)
        if c["ckpt"] in (None, "", "???"):
            raise ValueError("ckpt: no checkpoint given; pass ckpt=PATH")
        if not c["out"]:
            raise ValueError("out: no output path given")
        c["ckpt"] = Path(str(c["ckpt"])).expanduser().absolute()
        c["out"] = Path(str(c["out"])).expanduser().absolute()
        c["cond"] = dict(c["cond"] or {})
        seed = check_int("seed", c["seed"], 0)
        c["noise"] = noise if isinstance(noise, ShapeNoise) else ShapeNoise.from_config(noise, seed)
        return cls(**c)

    def __post_init__(self) -> None:
        check_int("n_maps", self.n_maps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        check_int("max_attempts", self.max_attempts, 1)
        check_choice("format", self.format, FORMATS)
        if self.format == "fits":
            check_choice("fits_layout", self.fits_layout, FITS_LAYOUTS)
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be null, gzip or lzf, got {self.compression!r}")
        check_bool("ema", self.ema)
        check_bool("overwrite", self.overwrite)
        check_bool("progress", self.progress)
        check_bool("allow_extrapolation", self.allow_extrapolation)
        if self.out.is_dir() and not (self.format == "fits" and self.fits_layout == "files"):
            raise ValueError(f"out: {self.out} is a directory; give a file path")
        if not self.ckpt.is_file():
            raise ValueError(f"ckpt: {self.ckpt}: checkpoint not found")

    @property
    def parts(self) -> Path:
        """The work folder ``<out>.parts``."""
        return self.out.with_name(self.out.name + PARTS_SUFFIX)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the ``config`` of the output's provenance)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["noise"] = None if self.noise is None else self.noise.to_dict()
        return to_plain(d)


@dataclass
class Plan:
    """A resolved request (what ``job.json`` holds) plus what follows from it."""

    job: dict[str, Any]
    out: Path
    parts: Path
    conditions: np.ndarray  # [K, P], physical units
    param_names: tuple[str, ...]

    @classmethod
    def of(cls, request: GenerationRequest, sha256: str, param_names: tuple[str, ...], grid: np.ndarray) -> Plan:
        """The plan of ``request`` for a checkpoint (its sha256 and parameter names) and a condition grid."""
        job = {
            "format_version": JOB_FORMAT,
            "ckpt": str(request.ckpt),
            "ckpt_sha256": sha256,
            "ema": request.ema,
            "seed": request.seed,
            "temperature": request.temperature,
            "param_names": list(param_names),
            "conditions": grid.tolist(),
            "n_per_condition": request.n_maps,
            "n_total": request.n_maps * grid.shape[0],
            "batch_size": request.batch_size,
            "noise": None if request.noise is None else request.noise.to_dict(),
            "max_attempts": request.max_attempts,
        }
        return cls(job, request.out, request.parts, grid, tuple(param_names))

    @property
    def n_total(self) -> int:
        return int(self.job["n_total"])

    @property
    def batch_size(self) -> int:
        return int(self.job["batch_size"])

    @property
    def n_batches(self) -> int:
        return -(-self.n_total // self.batch_size)

    @property
    def job_hash(self) -> str:
        return _job_hash(_identity(self.job))

    def batch_indices(self, b: int) -> np.ndarray:
        return np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n_total))

    def cond_rows(self, indices: np.ndarray) -> np.ndarray | None:
        """Conditions ``[len(indices), P]`` of global map indices (condition-major order)."""
        if not self.param_names:
            return None
        return self.conditions[indices // int(self.job["n_per_condition"])]

    def part_path(self, b: int) -> Path:
        return self.parts / PART_NAME.format(b)

    def todo(self) -> list[int]:
        """Batches without a finished part."""
        return [b for b in range(self.n_batches) if not self.part_path(b).exists()]


def _job_hash(obj: Any) -> str:
    # The job_sha256 recipe (json.dumps with sorted keys, default separators) is part of the output
    # format: parts of an unfinished run and pipeline fingerprints of earlier runs stay valid.
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _identity(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What fixes the maps: the request without the checkpoint's path (its sha256 stays)."""
    return None if job is None else {k: v for k, v in job.items() if k != "ckpt"}


def out_exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


# --------------------------------------------------------------------------------------------
# The work folder and its parts
# --------------------------------------------------------------------------------------------


def prepare_parts(plan: Plan, overwrite: bool) -> int:
    """Create or reuse the work folder; returns the number of finished batches found."""
    parts, job_file = plan.parts, plan.parts / JOB_FILE
    if parts.exists() and not parts.is_dir():
        raise ValueError(f"{parts}: exists and is not a work folder; remove it")
    if parts.is_dir():
        old = None
        try:
            old = json.loads(job_file.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        unstarted = old is None and not any(parts.glob("part-*.h5"))
        if _identity(old) != _identity(plan.job) and not unstarted:
            if not overwrite:
                new = _identity(plan.job) or {}
                what = (
                    "has no readable job.json"
                    if old is None
                    else "differs in "
                    + ", ".join(sorted(k for k in set(old) | set(new) if k != "ckpt" and old.get(k) != new.get(k)))
                )
                raise ValueError(
                    f"{parts}: holds an unfinished generation whose request {what}; re-run that "
                    "command to finish it, or pass overwrite=true to discard it"
                )
            shutil.rmtree(parts)
        elif unstarted:  # a run that died before its job.json was written: nothing to resume
            shutil.rmtree(parts)
    if not parts.is_dir():
        parts.mkdir(parents=True)
        try:
            write_json(job_file, plan.job, indent=2)
        except BaseException:
            shutil.rmtree(parts, ignore_errors=True)  # no work folder without its job.json
            raise
    for stale in parts.glob(".*.tmp"):  # temp files of writers killed mid-batch
        stale.unlink(missing_ok=True)
    return sum(plan.part_path(b).exists() for b in range(plan.n_batches))


def part_meta(meta: StoreMeta, plan: Plan, extra: Mapping[str, Any]) -> StoreMeta:
    """The metadata of a mock store made from training maps described by ``meta``."""
    return dataclasses.replace(meta, kind="mock", param_names=plan.param_names, created_by={}, extra=dict(extra))


def write_part(plan: Plan, b: int, maps: np.ndarray, redrawn: list[int], meta: StoreMeta) -> None:
    """Write batch ``b`` (maps of :meth:`Plan.batch_indices`) as one part, atomically."""
    idx = plan.batch_indices(b)
    cond = plan.cond_rows(idx)
    pmeta = part_meta(meta, plan, {"job_sha256": plan.job_hash, "batch": b, "redrawn": redrawn})
    with MapStoreWriter(plan.part_path(b), pmeta, npix=maps.shape[-1], overwrite=True) as w:
        w.append(maps, params=None if cond is None else cond.astype(np.float32), realization=idx)


def _check_part(plan: Plan, b: int, st: Any) -> None:
    idx = plan.batch_indices(b)
    if (
        st.n != len(idx)
        or st.meta.extra.get("job_sha256") != plan.job_hash
        or not np.array_equal(st.read_realization(), idx)
    ):
        raise GenerationError(
            f"{st.path}: part does not belong to this request; delete {plan.parts} or pass overwrite=true"
        )


def scan_parts(plan: Plan) -> list[int]:
    """Check every part against the plan; the indices of redrawn maps (once per redraw)."""
    redrawn: list[int] = []
    for b in range(plan.n_batches):
        with open_store(plan.part_path(b)) as st:
            _check_part(plan, b, st)
            redrawn.extend(int(i) for i in st.meta.extra.get("redrawn", []))
    return redrawn


def remove_work_folder(plan: Plan) -> None:
    """Remove ``<out>.parts`` once the output is in place."""
    shutil.rmtree(plan.parts, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Finishing: merge the parts into the output
# --------------------------------------------------------------------------------------------


def final_meta(plan: Plan, request: GenerationRequest, training: Mapping[str, Any], redrawn: list[int]) -> StoreMeta:
    """The output's metadata: the training maps' geometry, ``kind="mock"`` and the job's provenance.

    ``training`` is the description of the training data (``meta`` :class:`StoreMeta`, ``npix``, ``store``).
    """
    job = plan.job
    meta: StoreMeta = training["meta"]
    extra = {
        "checkpoint": job["ckpt"],
        "checkpoint_sha256": job["ckpt_sha256"],
        "seed": job["seed"],
        "temperature": job["temperature"],
        "weights": "ema" if job["ema"] else "raw",
        "lensflow_version": __version__,
        "n_per_condition": job["n_per_condition"],
        "conditions": {"param_names": job["param_names"], "values": job["conditions"]},
        "batch_size": job["batch_size"],
        "noise": job["noise"],
        "allow_extrapolation": request.allow_extrapolation,
        "nonfinite_redraws": len(redrawn),
        "redrawn_maps": sorted(set(redrawn)),
        "training": {
            "store": training.get("store"),
            "npix": int(training["npix"]),
            "kind": meta.kind,
            "pixel_arcmin": meta.pixel_arcmin,
            "source_redshifts": meta.to_dict()["source_redshifts"],
            "periodic": meta.periodic,
        },
        "job_sha256": plan.job_hash,
        "streams": STREAMS,
    }
    return dataclasses.replace(part_meta(meta, plan, extra), created_by=provenance(request.to_dict()))


def merge_parts(plan: Plan, request: GenerationRequest, meta: StoreMeta, npix: int) -> None:
    """Merge the parts into ``out`` (HDF5 store, or FITS with a JSON sidecar), atomically."""
    if request.format == "hdf5":
        # One part open at a time (concat_stores keeps every input open: the open-file limit for thousands
        # of parts).
        with MapStoreWriter(
            plan.out, meta, npix=npix, overwrite=request.overwrite, compression=request.compression
        ) as w:
            for b in range(plan.n_batches):
                with open_store(plan.part_path(b)) as st:
                    w.append(st.read(), st.read_params(), st.read_realization(), st.split)
        return
    from lensflow import fitsio

    fitsio.write_mock_fits(
        plan.out,
        _fits_batches(plan),
        meta,
        layout=request.fits_layout,
        n_total=plan.n_total,
        overwrite=request.overwrite,
    )
    side = {
        "n_maps": plan.n_total,
        "format": "fits",
        "fits_layout": request.fits_layout,
        "kind": "mock",
        "pixel_arcmin": meta.pixel_arcmin,
        "source_redshifts": list(meta.source_redshifts),
        "periodic": meta.periodic,
        "param_names": list(meta.param_names),
        "created_by": dict(meta.created_by),
        "extra": dict(meta.extra),
    }
    write_json(sidecar(plan.out), to_plain(side, nan_to_none=True))


def _fits_batches(plan: Plan) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for b in range(plan.n_batches):
        with open_store(plan.part_path(b)) as st:
            idx = st.read_realization()
            # the requested float64 conditions (the HDF5 parts hold them as float32)
            params = plan.cond_rows(idx) if plan.param_names else st.read_params()
            yield st.read(), params, idx


def sidecar(out: Path) -> Path:
    """Provenance beside FITS output: ``mocks/`` -> ``mocks.json``, ``m.fits`` -> ``m.fits.json``."""
    return out.with_name(out.name + ".json")


def already_complete(plan: Plan, fmt: str) -> bool:
    """True when ``out`` holds this very request's finished output (a run killed after its final rename)."""
    if not plan.parts.is_dir():
        return False
    try:
        if _identity(json.loads((plan.parts / JOB_FILE).read_text())) != _identity(plan.job):
            return False
        if fmt == "hdf5":
            with open_store(plan.out) as st:
                extra, n = st.meta.extra, st.n
        else:
            side = json.loads(sidecar(plan.out).read_text())
            extra, n = side.get("extra", {}), side.get("n_maps")
    except (OSError, ValueError):
        return False
    return extra.get("job_sha256") == plan.job_hash and n == plan.n_total
