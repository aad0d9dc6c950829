"""A simulation spec: the keys that alone fix the maps, resolved once, validated and hashed.

:func:`resolve_spec` turns a composed config (complete, used as it is) or a partial mapping from Python (completed
from :mod:`lensflow.simulation.defaults`) into the canonical plain spec whose 12-hex SHA-256,
:func:`spec_hash`, names the cached store ``sim-<hash>.h5``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from lensflow._util.checks import check_int
from lensflow._util.hashing import hash_json
from lensflow._util.plain import merge, to_plain
from lensflow.sims.theory import check_cosmology, parse_sources
from lensflow.simulation.defaults import RUN_DEFAULTS, spec_defaults

__all__ = ["KINDS", "RUN_KEYS", "SIM_KEYS", "SPEC_KEYS", "cosmologies", "resolve_spec", "spec_hash", "spec_hash_of"]

#: Keys of a simulation spec (``conf/sim_spec/default.yaml``); they and only they determine the maps, and so
#: the cache file name of :func:`lensflow.simulation.cache.ensure_simulated`. A test keeps the tables equal to the YAML.
SPEC_KEYS: tuple[str, ...] = ("sim", "n_maps", "npix", "pixel_arcmin", "seed", "grid", "grid_mode", "split")
#: Run-time keys of ``conf/simulate.yaml``: where the store goes and how it is written, never what it holds.
RUN_KEYS: tuple[str, ...] = ("out", *RUN_DEFAULTS)
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


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Every spec key and a full ``sim`` node: ``spec`` itself when it has them (a composed config), else
    ``spec`` on top of the library defaults (:func:`~lensflow.simulation.defaults.spec_defaults`)."""
    if "sim" not in spec:
        return merge(spec_defaults(), spec)
    sim = spec["sim"]
    if isinstance(sim, str):
        return merge(spec_defaults(sim), {**spec, "sim": spec_defaults(sim)["sim"]})
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
    return merge(spec_defaults(base), spec)


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


def spec_hash_of(resolved: Mapping[str, Any]) -> str:
    """The hash of a spec already resolved (:func:`resolve_spec`): what names its cached store."""
    return hash_json(resolved, 12)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """12-hex SHA-256 of the resolved spec: equal specs (however written) give equal hashes."""
    return spec_hash_of(resolve_spec(spec))


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
    cosmologies(c)  # checks the grid and every cosmology of it


def cosmologies(c: Mapping[str, Any]) -> list[tuple[tuple[float, ...], dict[str, Any]]]:
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
