"""``python -m lensflow.simulate``: simulate κ maps into a map store.

Examples::

    python -m lensflow.simulate sim=lognormal_flat n_maps=2000 npix=128 pixel_arcmin=1.64 seed=0 out=data/kappa.h5
    python -m lensflow.simulate sim=gaussian_flat out=data/gauss.h5
    python -m lensflow.simulate 'grid={Omega_m:[0.25,0.3,0.35],sigma_8:[0.75,0.8,0.85]}' n_maps=500 out=data/grid.h5
    python -m lensflow.simulate sim=lognormal_fullsky sim.nside=1024 n_maps=3000 out=data/fullsky.h5
    python -m lensflow.simulate 'sim.z_source=[0.5,1.0,1.5]' out=data/tomo.h5   # three tomographic channels

Config: ``conf/simulate.yaml`` with the group ``conf/sim/`` (backend, kind, cosmology, sources). In grid mode
``n_maps`` is per cosmology and ``/params`` holds the grid values under their names. A map depends only on
the seed, its cosmology's index in the grid and its own index, not on ``batch_size``. Exit status 0 on
success, 2 with one ``error: ...`` line on stderr for bad input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lensflow.cli import hydra_cli
from lensflow.mapstore import MapStoreError, MapStoreWriter, StoreMeta, open_store
from lensflow.provenance import provenance
from lensflow.sims.theory import check_cosmology, hilbert2011_shift, parse_sources, source_labels

#: Keys of a simulation spec (``conf/simulate.yaml`` minus the output and run-time keys); they and only
#: they determine the maps, and so the cache file name of :func:`ensure_simulated`.
SPEC_KEYS: tuple[str, ...] = ("sim", "n_maps", "npix", "pixel_arcmin", "seed", "grid", "grid_mode", "split")
RUN_KEYS: tuple[str, ...] = ("out", "overwrite", "batch_size", "compression", "progress")
SIM_KEYS: dict[str, tuple[str, ...]] = {
    "flat": ("backend", "kind", "cosmology", "z_source", "shift", "periodic", "pad", "nonlinear"),
    "fullsky": (
        "backend",
        "kind",
        "cosmology",
        "z_source",
        "shift",
        "periodic",
        "nonlinear",
        "nside",
        "lmax",
        "shell_dx",
        "ncorr",
        "l_limber",
        "pixwin",
        "interpolation",
    ),
}


def _container(node: Any) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {k: _container(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_container(v) for v in node]
    return node


def _load_conf(rel: str) -> dict[str, Any]:
    res = files("lensflow.conf").joinpath(rel)
    if not res.is_file():
        raise ValueError(f"no config {rel} in lensflow.conf")
    cfg = OmegaConf.to_container(OmegaConf.create(res.read_text()), resolve=False)
    assert isinstance(cfg, dict)
    cfg.pop("defaults", None)
    cfg.pop("hydra", None)
    return cfg


def _sim_node(sim: Any) -> dict[str, Any]:
    """A complete sim node from a config name (``lognormal_flat``) or a (partial) mapping."""
    if isinstance(sim, str):
        try:
            return _load_conf(f"sim/{sim}.yaml")
        except ValueError:
            names = sorted(
                p.name[:-5] for p in files("lensflow.conf").joinpath("sim").iterdir() if p.name.endswith(".yaml")
            )
            raise ValueError(f"sim: unknown simulation config {sim!r}; available: {names}") from None
    if not isinstance(sim, Mapping):
        raise ValueError(f"sim must be a config name or a mapping, got {sim!r}")
    sim = dict(sim)
    base = _load_conf("sim/lognormal_fullsky.yaml" if sim.get("backend") == "fullsky" else "sim/lognormal_flat.yaml")
    merged = _container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(sim)))
    return merged


def resolve_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, plain simulation spec (keys :data:`SPEC_KEYS`), defaults from ``conf/simulate.yaml``."""
    spec = _container(spec)
    if not isinstance(spec, dict):
        raise ValueError(f"simulation spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"simulation spec has unknown keys {unknown}; allowed are {list(SPEC_KEYS)}")
    defaults = _load_conf("simulate.yaml")
    out = {k: spec.get(k, defaults.get(k)) for k in SPEC_KEYS}
    out["sim"] = _sim_node(spec.get("sim", "lognormal_flat"))
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
    if c.get("grid"):
        c["grid"] = {k: [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for k, v in c["grid"].items()}
    else:
        c["grid"] = None
    return c


def spec_hash(spec: Mapping[str, Any]) -> str:
    """12-hex SHA-256 of the resolved spec: equal specs (however written) give equal hashes."""
    blob = json.dumps(resolve_spec(spec), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


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
    if sim.get("kind") not in ("gaussian", "lognormal"):
        raise ValueError(f"sim.kind must be 'gaussian' or 'lognormal', got {sim.get('kind')!r}")
    check_cosmology(sim.get("cosmology") or {})
    parse_sources(sim.get("z_source"))
    _positive_int("n_maps", c["n_maps"])
    _positive_int("npix", c["npix"], 2)
    _positive_int("seed", c["seed"], 0)
    pix = c["pixel_arcmin"]
    if isinstance(pix, bool) or not isinstance(pix, (int, float)) or not (math.isfinite(pix) and pix > 0):
        raise ValueError(f"pixel_arcmin must be a positive number, got {pix!r}")
    if backend == "fullsky" and sim.get("periodic"):
        raise ValueError("sim.periodic must be false for the fullsky backend (patches are not periodic)")
    if c.get("grid_mode") not in ("product", "zip"):
        raise ValueError(f"grid_mode must be 'product' or 'zip', got {c.get('grid_mode')!r}")
    split = c.get("split") or {}
    fr = split.get("fractions", (0.8, 0.1, 0.1))
    if not (
        isinstance(fr, (list, tuple))
        and len(fr) == 3
        and all(isinstance(f, (int, float)) and f >= 0 for f in fr)
        and math.isclose(sum(fr), 1.0)
    ):
        raise ValueError(f"split.fractions must be three non-negative numbers summing to 1, got {fr!r}")
    _positive_int("split.seed", split.get("seed", 0), 0)
    for _, cosmo in _cosmologies(c):
        check_cosmology(cosmo)


def _cosmologies(c: Mapping[str, Any]) -> list[tuple[tuple[float, ...], dict[str, Any]]]:
    """(grid values, cosmology) per grid point; one point with no values without a grid."""
    base = dict(c["sim"]["cosmology"])
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
    out = []
    allowed = sorted(k for k in check_cosmology(base) if k != "transfer_function")
    for name in names:
        if name not in allowed:
            raise ValueError(f"grid.{name} is not a cosmology parameter; vary one of {allowed}")
    for p in points:
        cosmo = dict(base)
        cosmo.update(zip(names, p, strict=True))
        out.append((tuple(p), cosmo))
    return out


def _simulator(sim: Mapping[str, Any], cosmo: dict[str, Any], npix: int, pixel_arcmin: float):
    if sim["backend"] == "flat":
        from lensflow.sims.flat import FlatSimulator

        return FlatSimulator(
            npix,
            pixel_arcmin,
            cosmo,
            sim["z_source"],
            kind=sim["kind"],
            periodic=bool(sim.get("periodic", False)),
            shift=sim.get("shift"),
            pad=sim.get("pad", 2),
            nonlinear=bool(sim.get("nonlinear", True)),
        )
    from lensflow.sims.fullsky import FullSkySimulator

    return FullSkySimulator(
        int(sim["nside"]),
        cosmo,
        sim["z_source"],
        kind=sim["kind"],
        lmax=sim.get("lmax"),
        shell_dx=float(sim.get("shell_dx", 150.0)),
        shift=sim.get("shift"),
        ncorr=int(sim.get("ncorr", 3)),
        l_limber=int(sim.get("l_limber", -1)),
        pixwin=bool(sim.get("pixwin", False)),
        nonlinear=bool(sim.get("nonlinear", True)),
    )


def simulate(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Simulate maps as configured (``conf/simulate.yaml``) into the store ``cfg.out``; returns its path.

    Bad input raises ``ValueError`` before any file is created; an error during the simulation leaves
    no file at ``out`` (the store is written atomically).
    """
    full = _container(cfg)
    if not isinstance(full, dict):
        raise ValueError("simulate: config must be a mapping")
    c = resolve_spec({k: v for k, v in full.items() if k in SPEC_KEYS or k in RUN_KEYS})
    out = full.get("out")
    if not out:
        raise ValueError("out: give the path of the map store to write")
    out = Path(str(out))
    overwrite = bool(full.get("overwrite", False))
    if out.exists() and not overwrite:
        raise ValueError(f"out: {out} exists; pass overwrite=true to replace it")
    batch = _positive_int("batch_size", full.get("batch_size", 256) or 256)
    progress = bool(full.get("progress", True))
    sim = c["sim"]
    sources = parse_sources(sim["z_source"])
    points = _cosmologies(c)
    param_names = tuple(c["grid"]) if c.get("grid") else ()
    n_maps, npix, pix = int(c["n_maps"]), int(c["npix"]), float(c["pixel_arcmin"])
    backend = sim["backend"]
    extra: dict[str, Any] = {
        "backend": backend,
        "kind": sim["kind"],
        "cosmology": check_cosmology(sim["cosmology"]),
        "z_source": sim["z_source"],
        "spec_hash": spec_hash(c),
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
    meta_kw = dict(
        pixel_arcmin=pix,
        source_redshifts=tuple(source_labels(sources)),
        periodic=bool(sim.get("periodic", False)) and backend == "flat",
        kind="simulation",
        param_names=param_names,
        created_by=provenance({**c, **{k: full.get(k) for k in RUN_KEYS}}),
    )
    from tqdm.auto import tqdm

    split = c.get("split") or {}
    with (
        MapStoreWriter(
            out,
            StoreMeta(**meta_kw, extra=extra),
            npix=npix,
            overwrite=overwrite,
            compression=full.get("compression"),
            fractions=tuple(split.get("fractions", (0.8, 0.1, 0.1))),
            split_seed=int(split.get("seed", 0)),
        ) as writer,
        tqdm(total=n_maps * len(points), unit="map", disable=not progress, desc="simulate", file=sys.stderr) as bar,
    ):
        rid = 0
        for k, (pvals, cosmo) in enumerate(points):
            bar.set_postfix_str(f"cosmology {k + 1}/{len(points)}: spectra")
            simulator = _simulator(sim, cosmo, npix, pix)
            bar.set_postfix_str(f"cosmology {k + 1}/{len(points)}")
            stream = c["seed"] if not param_names else [int(c["seed"]), k]
            params = np.asarray(pvals, np.float32)[None] if param_names else None
            if backend == "flat":
                for lo in range(0, n_maps, batch):
                    b = min(batch, n_maps - lo)
                    maps = simulator.generate(b, seed=stream, start=lo)
                    writer.append(
                        maps,
                        None if params is None else np.repeat(params, b, axis=0),
                        realization=np.arange(rid, rid + b),
                    )
                    rid += b
                    bar.update(b)
            else:
                for maps, _r in simulator.patches(
                    n_maps, npix, pix, seed=stream, interpolation=str(sim.get("interpolation", "bilinear"))
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
    return out


def ensure_simulated(spec: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The store ``cache_dir/sim-<hash>.h5`` for ``spec`` (keys of ``conf/simulate.yaml`` minus out/overwrite),
    simulated (atomically, with a progress bar) only if it is not there yet."""
    resolved = resolve_spec(spec)
    run = {k: v for k, v in _container(spec).items() if k in ("batch_size", "progress", "compression")}
    path = Path(cache_dir) / f"sim-{spec_hash(resolved)}.h5"
    if path.exists():
        try:
            open_store(path).close()
            return path
        except MapStoreError:
            print(f"warning: {path} is not a valid map store; simulating it again", file=sys.stderr)
            path.unlink()
    try:
        simulate({**resolved, **run, "out": str(path), "overwrite": False})
    except (FileExistsError, ValueError):
        if path.exists():  # another process finished the same simulation first
            return path
        raise
    return path


main = hydra_cli("simulate", simulate)
main.__doc__ = "``python -m lensflow.simulate key=value ...``: exit 0 done, 2 bad input (one ``error:`` line)."


if __name__ == "__main__":
    main()
