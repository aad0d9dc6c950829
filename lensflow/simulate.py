"""``python -m lensflow.simulate``: simulate κ maps into a map store.

Examples::

    python -m lensflow.simulate sim=lognormal_flat n_maps=2000 npix=128 pixel_arcmin=1.64 seed=0 out=data/kappa.h5
    python -m lensflow.simulate sim=gaussian_flat out=data/gauss.h5
    python -m lensflow.simulate 'grid={Omega_m:[0.25,0.3,0.35],sigma_8:[0.75,0.8,0.85]}' n_maps=500 out=data/grid.h5
    python -m lensflow.simulate sim=lognormal_fullsky sim.nside=1024 n_maps=3000 out=data/fullsky.h5
    python -m lensflow.simulate 'sim.z_source=[0.5,1.0,1.5]' out=data/tomo.h5   # three tomographic channels

Config: ``conf/simulate.yaml``; its simulation spec is ``conf/sim_spec/default.yaml`` with the group ``conf/sim/``
(backend, kind, cosmology, sources). In grid mode ``n_maps`` is per cosmology and ``/params`` holds the grid values
under their names. A map depends only on the seed, its cosmology's index in the grid and its own index, not on
``batch_size``. Exit status 0 on success, 2 with one ``error: ...`` line on stderr for bad input.

A spec is resolved once per call (:func:`resolve_spec`): a composed config is complete and used as it is; a
partial mapping from Python (``{"n_maps": 4, "sim": {"cosmology": {"m_nu": 0}}}``) is completed from the composed
defaults of ``conf/simulate.yaml``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from lensflow import cli
from lensflow._util.checks import check_bool, check_int
from lensflow._util.hashing import hash_json
from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain
from lensflow._util.progress import progress
from lensflow.mapstore import MapStoreError, MapStoreWriter, StoreMeta, open_store
from lensflow.provenance import provenance
from lensflow.sims.theory import check_cosmology, hilbert2011_shift, parse_sources, source_labels

log = get_logger(__name__)

#: Keys of a simulation spec (``conf/sim_spec/default.yaml``); they and only they determine the maps, and so
#: the cache file name of :func:`ensure_simulated`. A test keeps these tables equal to the YAML.
SPEC_KEYS: tuple[str, ...] = ("sim", "n_maps", "npix", "pixel_arcmin", "seed", "grid", "grid_mode", "split")
#: Run-time keys of ``conf/simulate.yaml``: where the store goes and how it is written, never what it holds.
RUN_KEYS: tuple[str, ...] = ("out", "overwrite", "batch_size", "compression", "progress")
#: Keys of a ``sim`` node per backend (``conf/sim/*.yaml``).
_COMMON = ("backend", "kind", "cosmology", "z_source", "shift", "periodic", "nonlinear")
SIM_KEYS: dict[str, tuple[str, ...]] = {
    "flat": (*_COMMON, "pad"),
    "fullsky": (*_COMMON, "nside", "lmax", "shell_dx", "ncorr", "l_limber", "pixwin", "interpolation"),
    "nbody": (
        "backend", "kind", "cosmology", "z_source", "periodic", "box_size", "n_particles", "mesh_factor", "n_steps",
        "z_init", "n_cuts", "plane_mesh", "n_boxes", "device",
    ),
}  # fmt: skip
#: The kinds of map each backend makes.
KINDS: dict[str, tuple[str, ...]] = {
    "flat": ("gaussian", "lognormal"),
    "fullsky": ("gaussian", "lognormal"),
    "nbody": ("nbody",),
}
#: How :func:`ensure_simulated` writes a cached store when the spec does not say (a test keeps these equal to
#: the values of ``conf/simulate.yaml``).
CACHE_RUN_DEFAULTS: dict[str, Any] = {"batch_size": 256, "compression": None, "progress": True}


# --------------------------------------------------------------------------------------------
# The spec: resolved once, validated, canonical
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _composed_defaults(sim: str | None) -> dict[str, Any]:
    """The spec keys of ``conf/simulate.yaml`` composed (with ``sim=<sim>`` if given); plain, copy before changing."""
    from hydra.errors import HydraException

    try:
        cfg = cli.compose("simulate", [f"sim={sim}"] if sim is not None else [])
    except HydraException:
        names = sorted(
            p.name[:-5] for p in files("lensflow.conf").joinpath("sim").iterdir() if p.name.endswith(".yaml")
        )
        raise ValueError(f"sim: unknown simulation config {sim!r}; available: {names}") from None
    return {k: v for k, v in to_plain(cfg).items() if k in SPEC_KEYS}


def _defaults(sim: str | None = None) -> dict[str, Any]:
    return to_plain(_composed_defaults(sim))  # a fresh copy


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key (as OmegaConf merges configs)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Every spec key and a full ``sim`` node: ``spec`` itself when it has them (a composed config), else
    ``spec`` on top of the composed defaults."""
    if "sim" not in spec:
        return _merge(_defaults(), spec)
    sim = spec["sim"]
    if isinstance(sim, str):
        return _merge(_defaults(sim), {**spec, "sim": _defaults(sim)["sim"]})
    if not isinstance(sim, Mapping):
        raise ValueError(f"sim must be a config name or a mapping, got {sim!r}")
    backend = sim.get("backend")
    split = spec.get("split")
    if (
        all(k in spec for k in SPEC_KEYS)
        and backend in SIM_KEYS
        and all(k in sim for k in SIM_KEYS[backend])
        and isinstance(split, Mapping)
        and {"fractions", "seed"} <= set(split)
    ):
        return spec
    base = {"fullsky": "lognormal_fullsky", "nbody": "nbody_flat"}.get(backend, "lognormal_flat")
    return _merge(_defaults(base), spec)


def resolve_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, plain, validated simulation spec (keys :data:`SPEC_KEYS`) in canonical types."""
    spec = to_plain(spec)
    if not isinstance(spec, dict):
        raise ValueError(f"simulation spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"simulation spec has unknown keys {unknown}; allowed are {list(SPEC_KEYS)}")
    full = _complete({k: v for k, v in spec.items() if k in SPEC_KEYS})
    out = {k: full[k] for k in SPEC_KEYS}
    _validate(out)
    return _normalize(out)


def _normalize(c: dict[str, Any]) -> dict[str, Any]:
    """Canonical types (floats for reals, z_source as a list) so that equal specs hash equally."""
    sim = c["sim"]
    sim["cosmology"] = {k: str(v) if k == "transfer_function" else float(v) for k, v in sim["cosmology"].items()}
    sim["z_source"] = [
        s if isinstance(s, float) else {"z": s[0].tolist(), "nz": s[1].tolist()} for s in parse_sources(sim["z_source"])
    ]
    if sim.get("shift") is not None:
        sh = sim["shift"]
        sim["shift"] = [float(x) for x in sh] if isinstance(sh, (list, tuple)) else float(sh)
    c["pixel_arcmin"] = float(c["pixel_arcmin"])
    for key in ("box_size", "z_init"):
        if key in sim:
            sim[key] = float(sim[key])
    if c.get("grid"):
        c["grid"] = {k: [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for k, v in c["grid"].items()}
    else:
        c["grid"] = None
    return c


def _hash(resolved: Mapping[str, Any]) -> str:
    return hash_json(resolved, 12)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """12-hex SHA-256 of the resolved spec: equal specs (however written) give equal hashes."""
    return _hash(resolve_spec(spec))


def _validate(c: dict[str, Any]) -> None:
    sim = c["sim"]
    backend = sim.get("backend")
    if backend not in SIM_KEYS:
        raise ValueError(f"sim.backend must be one of {list(SIM_KEYS)}, got {backend!r}")
    unknown = sorted(set(sim) - set(SIM_KEYS[backend]))
    if unknown:
        raise ValueError(
            f"sim has unknown keys {unknown} for backend {backend!r}; allowed are {list(SIM_KEYS[backend])}"
        )
    if sim.get("kind") not in KINDS[backend]:
        raise ValueError(
            f"sim.kind must be one of {list(KINDS[backend])} for backend {backend!r}, got {sim.get('kind')!r}"
        )
    check_cosmology(sim.get("cosmology") or {})
    parse_sources(sim.get("z_source"))
    check_int("n_maps", c["n_maps"])
    check_int("npix", c["npix"], 2)
    check_int("seed", c["seed"], 0)
    pix = c["pixel_arcmin"]
    if isinstance(pix, bool) or not isinstance(pix, (int, float)) or not (math.isfinite(pix) and pix > 0):
        raise ValueError(f"pixel_arcmin must be a positive number, got {pix!r}")
    if backend in ("fullsky", "nbody") and sim.get("periodic"):
        raise ValueError(f"sim.periodic must be false for the {backend} backend (its maps are not periodic)")
    if backend == "nbody":
        check_int("sim.n_boxes", sim.get("n_boxes"), 1)
        if sim["n_boxes"] > c["n_maps"]:
            raise ValueError(f"sim.n_boxes ({sim['n_boxes']}) must not exceed n_maps ({c['n_maps']})")
    if c.get("grid_mode") not in ("product", "zip"):
        raise ValueError(f"grid_mode must be 'product' or 'zip', got {c.get('grid_mode')!r}")
    split = c.get("split")
    if not isinstance(split, Mapping) or set(split) != {"fractions", "seed"}:
        raise ValueError(f"split must be a mapping with the keys fractions and seed, got {split!r}")
    fr = split["fractions"]
    if not (
        isinstance(fr, (list, tuple))
        and len(fr) == 3
        and all(isinstance(f, (int, float)) and f >= 0 for f in fr)
        and math.isclose(sum(fr), 1.0)
    ):
        raise ValueError(f"split.fractions must be three non-negative numbers summing to 1, got {fr!r}")
    check_int("split.seed", split["seed"], 0)
    _cosmologies(c)  # checks the grid and every cosmology of it


def _cosmologies(c: Mapping[str, Any]) -> list[tuple[tuple[float, ...], dict[str, Any]]]:
    """(grid values, checked cosmology) per grid point; one point with no values without a grid."""
    base = check_cosmology(c["sim"]["cosmology"])
    grid = c.get("grid")
    if not grid:
        return [((), base)]
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid must be null or a mapping of parameter -> list of values, got {grid!r}")
    names = list(grid)
    values = []
    for name in names:
        v = grid[name]
        v = [v] if isinstance(v, (int, float)) else v
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"grid.{name} must be a non-empty list of numbers, got {grid[name]!r}")
        values.append([float(x) for x in v])
    if c.get("grid_mode", "product") == "zip":
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"grid_mode=zip needs lists of equal length, got {[len(v) for v in values]}")
        points = list(zip(*values, strict=True))
    else:
        points = list(itertools.product(*values))
    allowed = sorted(k for k in base if k != "transfer_function")
    for name in names:
        if name not in allowed:
            raise ValueError(f"grid.{name} is not a cosmology parameter; vary one of {allowed}")
    return [(tuple(p), check_cosmology({**c["sim"]["cosmology"], **dict(zip(names, p, strict=True))})) for p in points]


# --------------------------------------------------------------------------------------------
# The job: a resolved spec and where and how to write it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationJob:
    """One call of :func:`simulate`, typed once at entry: the resolved spec and the run-time keys."""

    spec: dict[str, Any]  # resolved (resolve_spec)
    out: Path
    overwrite: bool
    batch_size: int
    compression: str | None
    progress: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SimulationJob:
        """From ``conf/simulate.yaml`` composed (or an equivalent mapping; missing spec keys take the defaults)."""
        full = to_plain(cfg)
        if not isinstance(full, dict):
            raise ValueError("simulate: config must be a mapping")
        spec = resolve_spec({k: v for k, v in full.items() if k in SPEC_KEYS or k in RUN_KEYS})
        run = {**CACHE_RUN_DEFAULTS, "overwrite": False, **{k: full[k] for k in RUN_KEYS if k in full}}
        return cls.checked(spec, run)

    @classmethod
    def checked(cls, spec: dict[str, Any], run: Mapping[str, Any]) -> SimulationJob:
        """A job from a resolved spec and the run-time keys (:data:`RUN_KEYS`), checked."""
        if not run.get("out"):
            raise ValueError("out: give the path of the map store to write")
        out = Path(str(run["out"]))
        overwrite = check_bool("overwrite", run["overwrite"])
        if out.exists() and not overwrite:
            raise ValueError(f"out: {out} exists; pass overwrite=true to replace it")
        batch = check_int("batch_size", run["batch_size"] or CACHE_RUN_DEFAULTS["batch_size"])
        return cls(spec, out, overwrite, batch, run["compression"], bool(run["progress"]))


def _store_meta(job: SimulationJob, points: list[tuple[tuple[float, ...], dict[str, Any]]]) -> StoreMeta:
    c = job.spec
    sim = c["sim"]
    sources = parse_sources(sim["z_source"])
    param_names = tuple(c["grid"]) if c.get("grid") else ()
    backend = sim["backend"]
    extra: dict[str, Any] = {
        "backend": backend,
        "kind": sim["kind"],
        "cosmology": check_cosmology(sim["cosmology"]),
        "z_source": sim["z_source"],
        "spec_hash": _hash(c),
        "spec": c,
    }
    if param_names:
        extra["grid"] = {"names": list(param_names), "points": [list(p) for p, _ in points]}
    if sim["kind"] == "lognormal":
        # flat: the κ shift per channel; fullsky: the shift of the lognormal matter shells
        if backend == "flat":
            extra["shift"] = (
                hilbert2011_shift(sources).tolist()
                if sim.get("shift") is None
                else np.broadcast_to(np.asarray(sim["shift"], float), (len(sources),)).tolist()
            )
        else:
            extra["shift"] = 1.0 if sim.get("shift") is None else float(sim["shift"])
    run = {
        "out": str(job.out),
        "overwrite": job.overwrite,
        "batch_size": job.batch_size,
        "compression": job.compression,
        "progress": job.progress,
    }
    return StoreMeta(
        pixel_arcmin=float(c["pixel_arcmin"]),
        source_redshifts=tuple(source_labels(sources)),
        periodic=bool(sim["periodic"]) and backend == "flat",
        kind="simulation",
        param_names=param_names,
        created_by=provenance({**c, **run}),
        extra=extra,
    )


def _simulator(sim: Mapping[str, Any], cosmo: dict[str, Any], npix: int, pixel_arcmin: float) -> Any:
    if sim["backend"] == "nbody":
        from lensflow.sims.nbody import NBodySimulator

        return NBodySimulator(
            npix,
            pixel_arcmin,
            cosmo,
            sim["z_source"],
            box_size=float(sim["box_size"]),
            n_particles=sim["n_particles"],
            mesh_factor=sim["mesh_factor"],
            n_steps=sim["n_steps"],
            z_init=float(sim["z_init"]),
            n_cuts=sim["n_cuts"],
            plane_mesh=sim["plane_mesh"],
            device=str(sim["device"]),
        )
    if sim["backend"] == "flat":
        from lensflow.sims.flat import FlatSimulator

        return FlatSimulator(
            npix,
            pixel_arcmin,
            cosmo,
            sim["z_source"],
            kind=sim["kind"],
            periodic=bool(sim["periodic"]),
            shift=sim["shift"],
            pad=sim["pad"],
            nonlinear=bool(sim["nonlinear"]),
        )
    from lensflow.sims.fullsky import FullSkySimulator

    return FullSkySimulator(
        int(sim["nside"]),
        cosmo,
        sim["z_source"],
        kind=sim["kind"],
        lmax=sim["lmax"],
        shell_dx=float(sim["shell_dx"]),
        shift=sim["shift"],
        ncorr=int(sim["ncorr"]),
        l_limber=int(sim["l_limber"]),
        pixwin=bool(sim["pixwin"]),
        nonlinear=bool(sim["nonlinear"]),
    )


def _write_point(
    job: SimulationJob, writer: MapStoreWriter, bar: Any, simulator: Any, stream: Any, params: Any, rid: int
) -> int:
    """Every map of one grid point into ``writer``; returns the next realization id."""
    c = job.spec
    n_maps, batch = int(c["n_maps"]), job.batch_size
    if c["sim"]["backend"] == "nbody":
        return _write_boxes(job, writer, bar, simulator, stream, params, rid)
    if c["sim"]["backend"] == "flat":
        for lo in range(0, n_maps, batch):
            b = min(batch, n_maps - lo)
            maps = simulator.generate(b, seed=stream, start=lo)
            writer.append(
                maps, None if params is None else np.repeat(params, b, axis=0), realization=np.arange(rid, rid + b)
            )
            rid += b
            bar.update(b)
        return rid
    interpolation = str(c["sim"]["interpolation"])
    for maps, _r in simulator.patches(
        n_maps, int(c["npix"]), float(c["pixel_arcmin"]), seed=stream, interpolation=interpolation
    ):
        b = maps.shape[0]
        for lo in range(0, b, batch):
            part = maps[lo : lo + batch]
            writer.append(
                part,
                None if params is None else np.repeat(params, part.shape[0], axis=0),
                realization=np.full(part.shape[0], rid),
            )
        rid += 1
        bar.update(b)
    return rid


def box_splits(n_boxes: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) per box: a seeded shuffle of the boxes cut at the fractions.

    Each split with a positive fraction gets at least one box when there are enough boxes, so a held-out split
    never comes out empty by chance (hashing few ids, as :func:`lensflow.mapstore.assign_splits` does, can).
    """
    counts = [int(round(f * n_boxes)) for f in fractions[1:]]
    for i, f in enumerate(fractions[1:]):
        if f > 0 and counts[i] == 0 and n_boxes >= 3:
            counts[i] = 1
    n_train = n_boxes - sum(counts)
    codes = np.repeat(np.arange(3), [n_train, *counts])
    return codes[np.random.default_rng(seed).permutation(n_boxes)]


def _write_boxes(
    job: SimulationJob, writer: MapStoreWriter, bar: Any, simulator: Any, stream: Any, params: Any, rid: int
) -> int:
    """Every map of one grid point from its N-body boxes; a box's maps share its realization id and split."""
    c = job.spec
    n_maps, n_boxes = int(c["n_maps"]), int(c["sim"]["n_boxes"])
    split = c["split"]
    codes = box_splits(n_boxes, tuple(split["fractions"]), int(split["seed"]))
    for b in range(n_boxes):
        bar.set_postfix_str(f"box {b + 1}/{n_boxes}: PM run")
        planes = simulator.box_planes(stream, b)
        bar.set_postfix_str(f"box {b + 1}/{n_boxes}: maps")
        idx = simulator.box_range(b, n_maps, n_boxes)
        for lo in range(idx.start, idx.stop, job.batch_size):
            ids = range(lo, min(idx.stop, lo + job.batch_size))
            maps = simulator.maps(planes, stream, ids)
            k = len(ids)
            writer.append(
                maps,
                None if params is None else np.repeat(params, k, axis=0),
                realization=np.full(k, rid + b),
                split=np.full(k, codes[b]),
            )
            bar.update(k)
    return rid + n_boxes


def simulate(cfg: SimulationJob | Mapping[str, Any]) -> Path:
    """Simulate maps as configured (``conf/simulate.yaml``) into the store ``cfg.out``; returns its path.

    ``cfg`` is the composed config, a plain mapping of the same keys (missing spec keys take the defaults), or a
    :class:`SimulationJob`. Bad input raises ``ValueError`` before any file is created; an error during the
    simulation leaves no file at ``out`` (the store is written atomically).
    """
    job = cfg if isinstance(cfg, SimulationJob) else SimulationJob.from_config(cfg)
    with target_lock(job.out):  # one run per output; stale temporaries of killed runs go
        return _simulate(job)


def _simulate(job: SimulationJob) -> Path:
    c = job.spec
    points = _cosmologies(c)
    meta = _store_meta(job, points)
    split = c["split"]
    n_total = int(c["n_maps"]) * len(points)
    # An N-body simulator checks its geometry (box, plane mesh, light cone) when built, which is cheap (no box is run
    # yet): build them all before the store exists, so bad geometry leaves no file behind.
    built = (
        [_simulator(c["sim"], cosmo, int(c["npix"]), float(c["pixel_arcmin"])) for _, cosmo in points]
        if c["sim"]["backend"] == "nbody"
        else None
    )
    with (
        MapStoreWriter(
            job.out,
            meta,
            npix=int(c["npix"]),
            overwrite=job.overwrite,
            compression=job.compression,
            fractions=tuple(split["fractions"]),
            split_seed=int(split["seed"]),
        ) as writer,
        progress(n_total, unit="map", desc="simulate", enabled=job.progress) as bar,
    ):
        rid = 0
        for k, (pvals, cosmo) in enumerate(points):
            bar.set_postfix_str(f"cosmology {k + 1}/{len(points)}: spectra")
            simulator = built[k] if built else _simulator(c["sim"], cosmo, int(c["npix"]), float(c["pixel_arcmin"]))
            bar.set_postfix_str(f"cosmology {k + 1}/{len(points)}")
            stream = c["seed"] if not meta.param_names else [int(c["seed"]), k]
            params = np.asarray(pvals, np.float32)[None] if meta.param_names else None
            rid = _write_point(job, writer, bar, simulator, stream, params, rid)
    return job.out


def ensure_simulated(spec: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The store ``cache_dir/sim-<hash>.h5`` for ``spec`` (the keys of ``conf/sim_spec/default.yaml``, optionally
    ``batch_size``/``progress``/``compression``), simulated (atomically, with a progress bar) only if it is not
    there yet. The spec is resolved once."""
    plain = to_plain(spec)
    resolved = resolve_spec(plain)
    path = Path(cache_dir) / f"sim-{_hash(resolved)}.h5"
    if path.exists():
        try:
            open_store(path).close()
            return path
        except MapStoreError:
            log.warning("warning: %s is not a valid map store; simulating it again", path)
            path.unlink()
    run = {**CACHE_RUN_DEFAULTS, **{k: plain[k] for k in CACHE_RUN_DEFAULTS if k in plain}}
    with target_lock(path, wait=True):  # another process simulating the same spec: wait for it, then use its store
        if path.exists():
            return path
        simulate(SimulationJob.checked(resolved, {**run, "out": str(path), "overwrite": False}))
    return path


main = cli.command("simulate", simulate, render=str)  # prints the store path

if __name__ == "__main__":
    main()
