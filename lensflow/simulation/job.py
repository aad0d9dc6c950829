"""The simulation job: a :class:`~lensflow.simulation.request.SimulationRequest` written into a map store.

One simulator per cosmology of the grid (flat, full-sky or N-body backend), maps appended in batches; a map
depends only on the seed, its cosmology's index and its own index, not on ``batch_size``. The store is written
atomically, so an error leaves no file at ``out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.lock import target_lock
from lensflow._util.progress import progress
from lensflow.mapstore import MapStoreWriter, StoreMeta
from lensflow.provenance import provenance
from lensflow.sims.theory import check_cosmology, hilbert2011_shift, parse_sources, source_labels
from lensflow.simulation.request import SimulationRequest
from lensflow.simulation.spec import cosmologies, spec_hash_of

__all__ = ["box_splits", "simulate"]


def _store_meta(job: SimulationRequest, points: list[tuple[tuple[float, ...], dict[str, Any]]]) -> StoreMeta:
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
        "spec_hash": spec_hash_of(c),
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
    job: SimulationRequest, writer: MapStoreWriter, bar: Any, simulator: Any, stream: Any, params: Any, rid: int
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
    job: SimulationRequest, writer: MapStoreWriter, bar: Any, simulator: Any, stream: Any, params: Any, rid: int
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


def simulate(cfg: SimulationRequest | Mapping[str, Any]) -> Path:
    """Simulate maps as configured (``conf/simulate.yaml``) into the store ``cfg.out``; returns its path.

    ``cfg`` is the composed config, a plain mapping of the same keys (missing spec keys take the defaults), or a
    :class:`SimulationRequest`. Bad input raises ``ValueError`` before any file is created; an error during the
    simulation leaves no file at ``out`` (the store is written atomically).
    """
    job = cfg if isinstance(cfg, SimulationRequest) else SimulationRequest.from_config(cfg)
    with target_lock(job.out):  # one run per output; stale temporaries of killed runs go
        return _simulate(job)


def _simulate(job: SimulationRequest) -> Path:
    c = job.spec
    points = cosmologies(c)
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
