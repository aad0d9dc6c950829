"""Batch generation of mock κ maps from a trained Glow checkpoint: ``python -m lensflow.generate``.

::

    python -m lensflow.generate ckpt=runs/kappa/best.ckpt n_maps=10000 out=mocks.h5
    python -m lensflow.generate ckpt=cond.ckpt n_maps=500 cond.Omega_m=[0.25,0.3] cond.sigma_8=0.8 out=grid.h5

Determinism
-----------
Map ``i`` (its global index in the output) depends only on ``(seed, i)``: its latent vector
``[C*H*W]`` is drawn from a CPU ``torch.Generator`` seeded by ``SeedSequence([seed, i, k])``, where
``k`` is the attempt (0 unless earlier draws of that map were non-finite), and handed to the flow as
``noise=``. Batch size, device count and CPU thread count therefore change a map only at float32
round-off (the flow's kernels see other shapes); the same batch layout on the same hardware and
thread count gives bit-identical maps.
Optional shape noise uses an independent stream per map, ``SeedSequence([noise.seed, i],
spawn_key=(1,))``.

For a grid of conditions (lists in ``cond``), the maps are ordered condition-major: the Cartesian
product in the order of the model's ``param_names`` (the first name varies slowest), ``n_maps``
per condition, so map ``i`` has condition ``i // n_maps``.

Streaming and resume
--------------------
Work goes into ``<out>.parts/``: ``job.json`` (the resolved request, with the checkpoint's sha256)
and one complete map store per batch, ``part-000000123.h5``, each written atomically. Memory is
constant in ``n_maps``. A killed run leaves readable parts and nothing at ``out``; running the same
command again skips the finished batches, and when all exist merges them into ``out`` (atomically)
and removes the work folder. The result equals an uninterrupted run.

Several devices
---------------
``devices=N`` starts N worker processes (one per GPU, or N CPU processes), which take batches
round-robin into the same work folder; the merged store is the same as with one device.

Output: a map store (``kind="mock"``, κ, per-map params for conditional models, provenance in
``created_by`` and ``extra``), or FITS (``format=fits``: a folder of one file per map, or one cube)
in the :mod:`lensflow.fitsio` convention that :mod:`lensflow.ingest` reads, with the provenance in
``<out>.json``. Exit code 0 done, 1 sampling failed (a map stayed non-finite), 2 bad input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue as queue_mod
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lensflow import __version__
from lensflow.cli import precheck
from lensflow.mapstore import MapStoreWriter, StoreMeta, open_store
from lensflow.provenance import provenance

PARTS_SUFFIX = ".parts"
JOB_FILE = "job.json"
PART_NAME = "part-{:09d}.h5"
JOB_FORMAT = 1
FORMATS = ("hdf5", "fits")
FITS_LAYOUTS = ("files", "cube")
ACCELERATORS = ("auto", "cpu", "cuda")

# Test hook: called as _HOOK(event, batch) at "sampled" (before a part is written), "writing"
# (inside the part writer, before commit), "written", and _HOOK("merged", -1) once the output is in
# place but the work folder not yet removed. Tests use it to crash a run at a chosen point; it is
# None in normal use.
_HOOK: Callable[[str, int], None] | None = None


class GenerationError(RuntimeError):
    """Generation failed after it started (e.g. a map stayed non-finite); one line."""


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


def stream_seed(seed: int, index: int, attempt: int = 0) -> int:
    """64-bit seed of the latent stream of map ``index``, attempt ``attempt`` (a SeedSequence hash)."""
    lo, hi = np.random.SeedSequence([seed, index, attempt]).generate_state(2, np.uint32)
    return int(lo) | (int(hi) << 32)


def latent_noise(seed: int, indices: Sequence[int] | np.ndarray, dims: int, attempt: int = 0) -> torch.Tensor:
    """Standard-normal latent vectors float32 [len(indices), dims], one independent stream per map."""
    out = torch.empty((len(indices), dims), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for row, i in enumerate(indices):
        g.manual_seed(stream_seed(seed, int(i), attempt))
        torch.randn(dims, generator=g, out=out[row])
    return out


def _noise_rng(seed: int, index: int) -> np.random.Generator:
    # spawn_key (1,) keeps shape-noise streams disjoint from the latent streams of the same (seed, i).
    return np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(1,)))


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


def condition_grid(cond: Mapping[str, Any] | None, param_names: Sequence[str]) -> np.ndarray:
    """Conditions float64 [K, P] in the order of ``param_names``: the Cartesian product of ``cond``.

    ``cond`` maps each name to a number or a list of numbers; the first name varies slowest.
    An unconditional model (no ``param_names``) takes no conditions and gives one empty row.
    """
    cond = dict(cond or {})
    names = list(param_names)
    if not names:
        if cond:
            raise ValueError(f"cond: the model is unconditional, but conditions {sorted(cond)} were given")
        return np.zeros((1, 0))
    unknown = sorted(set(cond) - set(names))
    if unknown:
        raise ValueError(f"cond: unknown condition(s) {unknown}; the model is conditioned on {names}")
    missing = [n for n in names if n not in cond]
    if missing:
        raise ValueError(
            f"cond: missing value(s) for {missing}; the model is conditioned on {names} (e.g. cond.{missing[0]}=0.3)"
        )
    axes = []
    for name in names:
        v = cond[name]
        vals = list(v) if isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, (str, bytes)) else [v]
        if not vals:
            raise ValueError(f"cond.{name}: empty list of values")
        try:
            arr = np.array([float(x) for x in vals])
        except (TypeError, ValueError):
            raise ValueError(f"cond.{name}: values must be numbers, got {v!r}") from None
        if not np.isfinite(arr).all():
            raise ValueError(f"cond.{name}: values must be finite, got {v!r}")
        axes.append(arr)
    return np.array(list(itertools.product(*axes)), dtype=np.float64).reshape(-1, len(names))


# --------------------------------------------------------------------------------------------
# Loading and sampling
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_module(ckpt: str | os.PathLike, device: torch.device) -> Any:
    from lensflow.module import load_glow_module

    module = load_glow_module(ckpt, map_location="cpu")
    return module.to(device).eval()


def _map_shape(module: Any) -> tuple[int, int, int]:
    mm = module.map_meta
    return int(mm["channels"]), int(mm["npix"]), int(mm["npix"])


@dataclass
class _Sampler:
    """Draws the maps of given global indices from one module on one device (finite maps only)."""

    module: Any
    device: torch.device
    seed: int
    temperature: float
    ema: bool
    max_attempts: int
    noise: Mapping[str, Any] | None = None  # resolved shape-noise model {sigma_e, n_gal, seed}

    def __post_init__(self) -> None:
        self.shape = _map_shape(self.module)
        self.dims = int(np.prod(self.shape))
        self.pixel_arcmin = float(self.module.map_meta["pixel_arcmin"])

    @torch.inference_mode()
    def draw(self, indices: np.ndarray, cond: np.ndarray | None) -> tuple[np.ndarray, list[int]]:
        """Maps float32 [B, C, H, W] for global ``indices`` with conditions [B, P] (physical units).

        Returns the maps and the indices of maps that needed a redraw (once per redraw).
        """
        B = len(indices)
        out = np.empty((B, *self.shape), dtype=np.float32)
        todo = np.arange(B)
        redrawn: list[int] = []
        for attempt in range(self.max_attempts):
            z = latent_noise(self.seed, indices[todo], self.dims, attempt).to(self.device)
            # Physical conditions go in as float64; the module normalises them with its training statistics.
            x = self._sample(len(todo), None if cond is None else cond[todo], z)
            x = x.detach().to("cpu", torch.float32).numpy().reshape(len(todo), *self.shape)
            ok = np.isfinite(x).reshape(len(todo), -1).all(axis=1)
            out[todo[ok]] = x[ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
            redrawn.extend(int(i) for i in indices[todo])
        else:
            raise GenerationError(
                f"map {int(indices[todo[0]])} (and {todo.size - 1} more in its batch) was non-finite in all "
                f"{self.max_attempts} attempts at temperature={self.temperature}; the model is unstable "
                "there (try a lower temperature or another checkpoint)"
            )
        if self.noise is not None:
            out += self._shape_noise(indices)
        return out, redrawn

    def _sample(self, n: int, cond: np.ndarray | None, z: torch.Tensor) -> torch.Tensor:
        return self.module.sample(n, cond=cond, temperature=self.temperature, noise=z, ema=self.ema)

    def _shape_noise(self, indices: np.ndarray) -> np.ndarray:
        from lensflow.stats import shape_noise

        nz = self.noise
        assert nz is not None
        return np.stack(
            [
                np.asarray(
                    shape_noise(
                        self.shape,
                        self.pixel_arcmin,
                        sigma_e=nz["sigma_e"],
                        n_gal=nz["n_gal"],
                        generator=_noise_rng(int(nz["seed"]), int(i)),
                    ),
                    dtype=np.float32,
                )
                for i in indices
            ]
        )


def _resolve_noise(noise: Mapping[str, Any] | None, seed: int) -> dict[str, float] | None:
    """The shape-noise model, or None when off (``sigma_e`` null or 0)."""
    if not noise or noise.get("sigma_e") in (None, 0, 0.0):
        return None
    sigma_e, n_gal = noise.get("sigma_e"), noise.get("n_gal")
    if not isinstance(sigma_e, (int, float)) or not math.isfinite(sigma_e) or sigma_e < 0:
        raise ValueError(f"noise.sigma_e must be a non-negative number (null = no noise), got {sigma_e!r}")
    if not isinstance(n_gal, (int, float)) or not math.isfinite(n_gal) or n_gal <= 0:
        raise ValueError(f"noise.n_gal must be a positive number of galaxies per arcmin², got {n_gal!r}")
    nseed = noise.get("seed")
    nseed = seed if nseed is None else nseed
    if not isinstance(nseed, int) or isinstance(nseed, bool) or nseed < 0:
        raise ValueError(f"noise.seed must be a non-negative integer or null, got {nseed!r}")
    return {"sigma_e": float(sigma_e), "n_gal": float(n_gal), "seed": int(nseed)}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_temperature(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number, got {t!r}")
    return float(t)


def _cond_rows(cond: Any, n: int, param_names: Sequence[str]) -> np.ndarray | None:
    """Per-map conditions [n, P] from a dict {name: value or [n] values} or an array [n, P] / [P]."""
    names = list(param_names)
    if cond is None or (isinstance(cond, Mapping) and not cond):
        if names:
            raise ValueError(f"cond: the model is conditioned on {names}; pass cond={{name: value}}")
        return None
    if not names:
        raise ValueError("cond: the model is unconditional, but conditions were given")
    if isinstance(cond, Mapping):
        unknown = sorted(set(cond) - set(names))
        missing = [k for k in names if k not in cond]
        if unknown or missing:
            raise ValueError(f"cond: model is conditioned on {names}; unknown {unknown}, missing {missing}")
        cols = []
        for k in names:
            v = np.asarray(cond[k], dtype=np.float64).reshape(-1)
            if v.size not in (1, n):
                raise ValueError(f"cond[{k!r}]: expected 1 or {n} values, got {v.size}")
            cols.append(np.broadcast_to(v, (n,)))
        rows = np.stack(cols, axis=1)
    else:
        rows = np.asarray(cond.detach().cpu() if isinstance(cond, torch.Tensor) else cond, dtype=np.float64)
        if rows.ndim == 1:
            rows = np.broadcast_to(rows, (n, rows.shape[0]))
        if rows.shape != (n, len(names)):
            raise ValueError(f"cond: expected shape [{n}, {len(names)}] for {names}, got {list(rows.shape)}")
    if not np.isfinite(rows).all():
        raise ValueError("cond: values must be finite")
    return np.ascontiguousarray(rows)


def sample_maps(
    ckpt_or_module: str | os.PathLike | Any,
    n: int,
    temperature: float = 1.0,
    cond: Mapping[str, Any] | np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    ema: bool = True,
    noise: Mapping[str, Any] | None = None,
    max_attempts: int = 10,
) -> np.ndarray:
    """Draw ``n`` mock κ maps float32 [n, C, H, W] in memory (the notebook API).

    The same maps as ``python -m lensflow.generate`` with the same seed, temperature and
    (single) condition: map ``i`` depends only on ``(seed, i)``.

    Args:
        ckpt_or_module: a checkpoint path or a loaded :class:`lensflow.module.GlowModule`.
        n: number of maps.
        temperature: latent temperature (> 0; 1 = the trained distribution).
        cond: for a conditional model, ``{name: value or [n] values}`` in physical units, or an
            array [n, P] / [P] in the order of ``module.param_names``.
        seed: generation seed (>= 0).
        batch_size: maps per forward pass (changes maps only at float32 round-off).
        device: torch device; default CUDA when available, else CPU. A module passed in is moved there.
        ema: sample with the EMA weights (default) or the raw weights.
        noise: optional shape noise ``{"sigma_e": 0.26, "n_gal": 30.0, "seed": None}`` (n_gal per arcmin²).
        max_attempts: draws per map before giving up on a non-finite map.
    """
    n = _check_int("n", n, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    temperature = _check_temperature(temperature)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if isinstance(ckpt_or_module, (str, os.PathLike)):
        module = _load_module(ckpt_or_module, dev)
    else:
        module = ckpt_or_module.to(dev).eval()
    rows = _cond_rows(cond, n, tuple(module.param_names))
    sampler = _Sampler(
        module,
        dev,
        seed,
        temperature,
        bool(ema),
        _check_int("max_attempts", max_attempts, 1),
        _resolve_noise(noise, seed),
    )
    out = np.empty((n, *sampler.shape), dtype=np.float32)
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        out[idx], _ = sampler.draw(idx, None if rows is None else rows[idx])
    return out


# --------------------------------------------------------------------------------------------
# The request, the work folder and its parts
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A resolved generation request (what job.json holds) plus derived quantities."""

    job: dict[str, Any]
    out: Path
    parts: Path
    conditions: np.ndarray  # [K, P]
    param_names: tuple[str, ...]

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
        return _hash(_identity(self.job))

    def batch_indices(self, b: int) -> np.ndarray:
        return np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n_total))

    def cond_rows(self, indices: np.ndarray) -> np.ndarray | None:
        if not self.param_names:
            return None
        return self.conditions[indices // int(self.job["n_per_condition"])]

    def part_path(self, b: int) -> Path:
        return self.parts / PART_NAME.format(b)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _identity(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What fixes the maps: the request without the checkpoint's path (its sha256 stays)."""
    return None if job is None else {k: v for k, v in job.items() if k != "ckpt"}


def _out_exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _as_container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _plan(cfg: DictConfig) -> tuple[_Plan, Any]:
    """Validate the request (no file is created) and resolve it; returns the plan and the module (CPU)."""
    ckpt = None if "ckpt" not in cfg or OmegaConf.is_missing(cfg, "ckpt") else cfg.get("ckpt")
    if ckpt in (None, ""):
        raise ValueError("ckpt: no checkpoint given; pass ckpt=PATH")
    n_maps = _check_int("n_maps", cfg.get("n_maps"), 1)
    batch_size = _check_int("batch_size", cfg.get("batch_size"), 1)
    seed = _check_int("seed", cfg.get("seed"), 0)
    temperature = _check_temperature(cfg.get("temperature"))
    max_attempts = _check_int("max_attempts", cfg.get("max_attempts", 10), 1)
    fmt = cfg.get("format", "hdf5")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    layout = cfg.get("fits_layout", "files")
    if fmt == "fits" and layout not in FITS_LAYOUTS:
        raise ValueError(f"fits_layout must be one of {FITS_LAYOUTS}, got {layout!r}")
    if cfg.get("compression") not in (None, "gzip", "lzf"):
        raise ValueError(f"compression must be null, gzip or lzf, got {cfg.get('compression')!r}")
    if not isinstance(cfg.get("ema", True), bool):
        raise ValueError(f"ema must be true or false, got {cfg.get('ema')!r}")
    out_s = cfg.get("out")
    if not out_s:
        raise ValueError("out: no output path given")
    out = Path(str(out_s)).expanduser().absolute()
    parts = out.with_name(out.name + PARTS_SUFFIX)
    if out.is_dir() and not (fmt == "fits" and layout == "files"):
        raise ValueError(f"out: {out} is a directory; give a file path")
    noise = _resolve_noise(_as_container(cfg.get("noise")), seed)
    ckpt_path = Path(str(ckpt)).expanduser().absolute()
    if not ckpt_path.is_file():
        raise ValueError(f"ckpt: {ckpt_path}: checkpoint not found")
    module = _load_module(ckpt_path, torch.device("cpu"))  # raises a one-line ValueError for foreign files
    param_names = tuple(module.param_names)
    grid = condition_grid(_as_container(cfg.get("cond")) or {}, param_names)
    job = {
        "format_version": JOB_FORMAT,
        "ckpt": str(ckpt_path),
        "ckpt_sha256": sha256_file(ckpt_path),
        "ema": bool(cfg.get("ema", True)),
        "seed": seed,
        "temperature": temperature,
        "param_names": list(param_names),
        "conditions": grid.tolist(),
        "n_per_condition": n_maps,
        "n_total": n_maps * grid.shape[0],
        "batch_size": batch_size,
        "noise": noise,
        "max_attempts": max_attempts,
    }
    return _Plan(job, out, parts, grid, param_names), module


def _prepare_parts(plan: _Plan, overwrite: bool) -> int:
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
        if _identity(old) != _identity(plan.job):
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
    if not parts.is_dir():
        parts.mkdir(parents=True)
        tmp = parts / (JOB_FILE + ".tmp")
        tmp.write_text(json.dumps(plan.job, indent=2))
        os.replace(tmp, job_file)
    for stale in parts.glob(".*.tmp"):  # temp files of writers killed mid-batch
        stale.unlink(missing_ok=True)
    return sum(plan.part_path(b).exists() for b in range(plan.n_batches))


def _part_meta(plan: _Plan, map_meta: Mapping[str, Any], extra: Mapping[str, Any]) -> StoreMeta:
    return StoreMeta(
        pixel_arcmin=float(map_meta["pixel_arcmin"]),
        source_redshifts=tuple(float(z) for z in map_meta["source_redshifts"]),
        periodic=bool(map_meta.get("periodic", False)),
        kind="mock",
        param_names=plan.param_names,
        extra=dict(extra),
    )


def _write_batch(plan: _Plan, sampler: _Sampler, map_meta: Mapping[str, Any], b: int) -> tuple[int, int]:
    """Sample batch ``b`` and write it as one part (atomically); returns (maps, redraws)."""
    idx = plan.batch_indices(b)
    cond = plan.cond_rows(idx)
    maps, redrawn = sampler.draw(idx, cond)
    if _HOOK is not None:
        _HOOK("sampled", b)
    meta = _part_meta(plan, map_meta, {"job_sha256": plan.job_hash, "batch": b, "redrawn": redrawn})
    with MapStoreWriter(plan.part_path(b), meta, npix=sampler.shape[-1], overwrite=True) as w:
        w.append(maps, params=None if cond is None else cond.astype(np.float32), realization=idx)
        if _HOOK is not None:
            _HOOK("writing", b)
    if _HOOK is not None:
        _HOOK("written", b)
    return len(idx), len(redrawn)


def _worker(
    rank: int, nprocs: int, plan: _Plan, todo: list[int], device_kind: str, threads: int, ema: bool, q: Any
) -> None:
    """One worker process: batches ``todo[rank::nprocs]`` on its own device."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(f"cuda:{rank}") if device_kind == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        module = _load_module(plan.job["ckpt"], device)
        map_meta = dict(module.map_meta)
        sampler = _Sampler(
            module, device, plan.job["seed"], plan.job["temperature"], ema, plan.job["max_attempts"], plan.job["noise"]
        )
        for b in todo[rank::nprocs]:
            n, r = _write_batch(plan, sampler, map_meta, b)
            q.put(("done", rank, n, r))
        q.put(("finished", rank, 0, 0))
    except BaseException as e:  # report one line to the parent, then die with the traceback
        q.put(("error", rank, f"{type(e).__name__}: {e}".splitlines()[0], 0))
        raise


def _resolve_devices(devices: Any, accelerator: str) -> tuple[str, int]:
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    cuda = torch.cuda.is_available() and accelerator != "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("accelerator=cuda, but no CUDA device is available")
    if devices in (None, "auto"):
        return ("cuda", torch.cuda.device_count()) if cuda else ("cpu", 1)
    n = _check_int("devices", devices, 1) if not isinstance(devices, str) else None
    if n is None:
        try:
            n = _check_int("devices", int(devices), 1)
        except ValueError:
            raise ValueError(f"devices must be 'auto' or a positive integer, got {devices!r}") from None
    if cuda and n > torch.cuda.device_count():
        raise ValueError(f"devices={n}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return ("cuda" if cuda else "cpu"), n


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="map",
        desc="generate",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _run_batches(
    plan: _Plan, module: Any, todo: list[int], device_kind: str, nprocs: int, ema: bool, progress: bool, done_maps: int
) -> tuple[int, int]:
    """Sample the batches in ``todo``; returns (maps written this run, non-finite redraws this run)."""
    written = redraws = 0
    bar = _progress(plan.n_total, done_maps, progress)
    try:
        if nprocs == 1 or len(todo) <= 1:
            device = torch.device("cuda:0" if device_kind == "cuda" else "cpu")
            module = module.to(device).eval()
            map_meta = dict(module.map_meta)
            sampler = _Sampler(
                module,
                device,
                plan.job["seed"],
                plan.job["temperature"],
                ema,
                plan.job["max_attempts"],
                plan.job["noise"],
            )
            for b in todo:
                n, r = _write_batch(plan, sampler, map_meta, b)
                written, redraws = written + n, redraws + r
                bar.update(n)
                bar.set_postfix(redraws=redraws, refresh=False)
            return written, redraws
        nprocs = min(nprocs, len(todo))
        threads = max(1, torch.get_num_threads() // nprocs) if device_kind == "cpu" else 1
        ctx = torch.multiprocessing.get_context("spawn")
        q = ctx.Queue()
        pc = torch.multiprocessing.start_processes(
            _worker,
            args=(nprocs, plan, todo, device_kind, threads, ema, q),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        errors: list[str] = []

        def drain(timeout: float) -> None:
            nonlocal written, redraws
            try:
                while True:
                    kind, rank, a, r = q.get(timeout=timeout)
                    if kind == "done":
                        written, redraws = written + a, redraws + r
                        bar.update(a)
                        bar.set_postfix(redraws=redraws, refresh=False)
                    elif kind == "error":
                        errors.append(f"worker {rank}: {a}")
            except queue_mod.Empty:
                pass

        try:
            while not pc.join(timeout=0.05):
                drain(0.2)
            drain(0.05)
        except Exception as e:  # a worker raised or died (e.g. killed for memory)
            drain(0.5)
            msg = errors[0] if errors else " ".join(str(e).split()[:40])
            raise GenerationError(
                f"generation failed in a worker process ({msg}); finished batches are kept "
                f"in {plan.parts}, re-run the command to resume"
            ) from None
        finally:
            for p in pc.processes:  # on any way out (also Ctrl-C) no worker is left behind
                if p.is_alive():
                    p.terminate()
        return written, redraws
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Finishing: merge the parts into the output
# --------------------------------------------------------------------------------------------


def _final_meta(
    plan: _Plan, map_meta: Mapping[str, Any], cfg: DictConfig, redraws: int, redrawn: list[int]
) -> StoreMeta:
    job = plan.job
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
        "nonfinite_redraws": redraws,
        "redrawn_maps": sorted(set(redrawn)),
        "training": _jsonable_meta(map_meta),
        "job_sha256": plan.job_hash,
        "streams": "latent of map i, attempt k: torch.randn(C*H*W) from a CPU torch.Generator seeded with "
        "s[0] + 2**32 * s[1], s = numpy SeedSequence([seed, i, k]).generate_state(2, uint32); "
        "shape noise of map i: numpy default_rng(SeedSequence([noise.seed, i], spawn_key=(1,)))",
    }
    meta = _part_meta(plan, map_meta, extra)
    cfg_plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return StoreMeta(
        meta.pixel_arcmin,
        meta.source_redshifts,
        meta.periodic,
        "mock",
        meta.param_names,
        created_by=provenance(cfg_plain),
        extra=extra,
    )


def _jsonable_meta(m: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(m), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _check_part(plan: _Plan, b: int, st: Any) -> None:
    idx = plan.batch_indices(b)
    if (
        st.n != len(idx)
        or st.meta.extra.get("job_sha256") != plan.job_hash
        or not np.array_equal(st.read_realization(), idx)
    ):
        raise GenerationError(
            f"{st.path}: part does not belong to this request; delete {plan.parts} or pass overwrite=true"
        )


def _scan_parts(plan: _Plan) -> tuple[int, list[int]]:
    redrawn: list[int] = []
    for b in range(plan.n_batches):
        with open_store(plan.part_path(b)) as st:
            _check_part(plan, b, st)
            redrawn.extend(int(i) for i in st.meta.extra.get("redrawn", []))
    return len(redrawn), redrawn


def _merge_hdf5(plan: _Plan, meta: StoreMeta, npix: int, compression: str | None, overwrite: bool) -> None:
    # One part open at a time (concat_stores keeps every input open, which runs into the open-file
    # limit for thousands of parts).
    with MapStoreWriter(plan.out, meta, npix=npix, overwrite=overwrite, compression=compression) as w:
        for b in range(plan.n_batches):
            with open_store(plan.part_path(b)) as st:
                w.append(st.read(), st.read_params(), st.read_realization(), st.split)


def _merge_fits(plan: _Plan, meta: StoreMeta, layout: str, overwrite: bool) -> None:
    from lensflow import fitsio

    def batches():
        for b in range(plan.n_batches):
            with open_store(plan.part_path(b)) as st:
                idx = st.read_realization()
                # the requested float64 conditions (the HDF5 parts hold them as float32)
                params = plan.cond_rows(idx) if plan.param_names else st.read_params()
                yield st.read(), params, idx

    fitsio.write_mock_fits(plan.out, batches(), meta, layout=layout, n_total=plan.n_total, overwrite=overwrite)


def _sidecar(out: Path) -> Path:
    """Provenance beside FITS output: ``mocks/`` -> ``mocks.json``, ``m.fits`` -> ``m.fits.json``."""
    return out.with_name(out.name + ".json")


def _already_complete(plan: _Plan, fmt: str) -> bool:
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
            side = json.loads(_sidecar(plan.out).read_text())
            extra, n = side.get("extra", {}), side.get("n_maps")
    except (OSError, ValueError):
        return False
    return extra.get("job_sha256") == plan.job_hash and n == plan.n_total


def _with_defaults(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    """``cfg`` over the defaults of ``conf/generate.yaml``, so a partial mapping works from Python."""
    from importlib.resources import files

    base = OmegaConf.load(str(files("lensflow.conf").joinpath("generate.yaml")))
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    user = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
    merged = OmegaConf.merge(base, user)
    assert isinstance(merged, DictConfig)
    return merged


def generate(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Generate mock maps as configured (see ``conf/generate.yaml``); returns the output path.

    Raises ``ValueError`` (one line) for bad input before any file is created, and
    :class:`GenerationError` when sampling fails (finished batches are kept for a resume).
    """
    cfg = _with_defaults(cfg)
    overwrite = cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be true or false, got {overwrite!r}")
    progress = bool(cfg.get("progress", True))
    device_kind, nprocs = _resolve_devices(cfg.get("devices", "auto"), str(cfg.get("accelerator", "auto")))
    plan, module = _plan(cfg)
    fmt, layout = cfg.get("format", "hdf5"), cfg.get("fits_layout", "files")
    if _out_exists(plan.out) and not overwrite:
        if _already_complete(plan, fmt):
            shutil.rmtree(plan.parts, ignore_errors=True)
            print(f"{plan.out} is already complete ({plan.n_total} maps); removed its work folder", flush=True)
            return plan.out
        raise ValueError(f"out: {plan.out} exists; pass overwrite=true to replace it")
    map_meta = dict(module.map_meta)
    n_done = _prepare_parts(plan, overwrite)
    todo = [b for b in range(plan.n_batches) if not plan.part_path(b).exists()]
    done_maps = plan.n_total - sum(len(plan.batch_indices(b)) for b in todo)
    if n_done:
        print(f"resuming: {n_done} of {plan.n_batches} batches already in {plan.parts}", file=sys.stderr)
    t0 = time.perf_counter()
    written, _ = _run_batches(plan, module, todo, device_kind, nprocs, plan.job["ema"], progress, done_maps)
    elapsed = time.perf_counter() - t0
    redraws, redrawn = _scan_parts(plan)
    meta = _final_meta(plan, map_meta, cfg, redraws, redrawn)
    if fmt == "hdf5":
        _merge_hdf5(plan, meta, int(map_meta["npix"]), cfg.get("compression"), overwrite)
    else:
        _merge_fits(plan, meta, layout, overwrite)
        side = {
            "n_maps": plan.n_total,
            "format": "fits",
            "fits_layout": layout,
            "kind": "mock",
            "pixel_arcmin": meta.pixel_arcmin,
            "source_redshifts": list(meta.source_redshifts),
            "periodic": meta.periodic,
            "param_names": list(meta.param_names),
            "created_by": dict(meta.created_by),
            "extra": dict(meta.extra),
        }
        tmp = _sidecar(plan.out).with_name("." + _sidecar(plan.out).name + ".tmp")
        tmp.write_text(json.dumps(side, indent=1, default=str))
        os.replace(tmp, _sidecar(plan.out))
    if _HOOK is not None:
        _HOOK("merged", -1)
    shutil.rmtree(plan.parts, ignore_errors=True)
    rate = written / elapsed if elapsed > 0 and written else float("nan")
    print(
        f"wrote {plan.n_total} mock maps to {plan.out} ({written} generated in this run at "
        f"{rate:.1f} maps/s on {nprocs} {device_kind} device(s); {redraws} non-finite redraw(s))",
        flush=True,
    )
    return plan.out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, OmegaConfBaseException)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _cond_overrides(argv: list[str]) -> list[str]:
    """``cond.NAME=v`` -> ``++cond.NAME=v``: condition names are open-ended (added, not overridden)."""
    return [f"++{a}" if a.startswith("cond.") and "=" in a else a for a in argv]


@hydra.main(config_path="pkg://lensflow.conf", config_name="generate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    except _BAD_INPUT as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except GenerationError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """``python -m lensflow.generate key=value ...``: exit 0 done, 1 sampling failed, 2 bad input."""
    args = _cond_overrides(sys.argv[1:])
    precheck("generate", args)
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


if __name__ == "__main__":
    main()
