"""Measurement: which maps are compared, the one SummaryConfig for both sets, and their statistics.

:func:`measure_pair` is the one measuring sequence of ``python -m lensflow.validate`` and of training's sample
check: the seed streams (:func:`seed_streams`), the SummaryConfig from the reference maps, then each set's
statistics with its own shape-noise stream. A set is maps in memory or ``(store, indices)``.
:func:`summary_config_for` and :func:`statistics_of` are its steps on maps in memory; :func:`build_summary_config`
and :func:`compute_statistics` the same two reading the maps from a store, so arrays and stores give the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from lensflow._util.seeds import child_ints
from lensflow.mapstore import MapStore, StoreMeta
from lensflow.stats.summary import SummaryConfig, summarize, with_reference_sigma
from lensflow.validation.config import MeasureOptions, check_split

__all__ = [
    "batches",
    "build_summary_config",
    "check_compatible",
    "compute_statistics",
    "measure_pair",
    "parameter_sets",
    "seed_streams",
    "select_indices",
    "statistics_of",
    "store_record",
    "summary_config_for",
]

Maps = np.ndarray | torch.Tensor
#: A set of maps to measure: maps [N, C, H, W] in memory, or a store and the indices of its maps.
MapSet = Maps | tuple[MapStore, np.ndarray]


class SeedStreams(NamedTuple):
    """The independent seeds of one comparison, spawned from its one seed (:func:`seed_streams`)."""

    subset_reference: int
    subset_candidate: int
    noise_reference: int
    noise_candidate: int
    sigma: int
    permutation: int


def seed_streams(seed: int) -> SeedStreams:
    """The seed split of validate and the sample check. Children 0..4 are the streams of lensflow <= 0.1 (spawned
    children do not depend on their count), so a seed gives the same subsets and noise as before."""
    return SeedStreams(*child_ints(seed, 6))


# ---------------------------------------------------------------------------------------------------
# Which maps
# ---------------------------------------------------------------------------------------------------


def select_indices(
    store: MapStore,
    split: str,
    select: Mapping[str, float] | None = None,
    max_maps: int | None = None,
    rng: np.random.Generator | None = None,
    what: str = "store",
) -> np.ndarray:
    """Sorted map indices of ``store``: one split, maps whose params equal ``select`` (rtol 1e-6), and at
    most ``max_maps`` of them (a random subset drawn with ``rng``, or the first ones without it)."""
    idx = store.indices(check_split(split, f"{what} split"))
    if select:
        names = store.meta.param_names
        missing = [k for k in select if k not in names]
        if missing:
            raise ValueError(f"select: {store.path} has no parameter(s) {missing}; it has {list(names)}")
        if idx.size:
            p = store.read_params(idx)
            keep = np.ones(idx.size, bool)
            for k, v in select.items():
                keep &= np.isclose(p[:, names.index(k)], float(v), rtol=1e-6, atol=0.0)
            idx = idx[keep]
    if idx.size == 0:
        sel = f" with params {dict(select)}" if select else ""
        raise ValueError(f"{what}: {store.path} has no maps in split {split!r}{sel}")
    if max_maps is not None:
        if int(max_maps) < 1:
            raise ValueError(f"max_maps must be positive or null, got {max_maps}")
        if idx.size > max_maps:
            idx = np.sort(rng.choice(idx, int(max_maps), replace=False)) if rng is not None else idx[:max_maps]
    return np.asarray(idx, dtype=np.int64)


def check_compatible(ref: MapStore, cand: MapStore, warnings: list[str], what: str = "candidate") -> None:
    """Refuse stores whose maps cannot be compared (shape, pixel scale); note softer differences."""
    if (cand.npix, cand.channels) != (ref.npix, ref.channels):
        raise ValueError(
            f"{what}: {cand.path} holds [{cand.channels}, {cand.npix}, {cand.npix}] maps, the "
            f"reference {ref.path} [{ref.channels}, {ref.npix}, {ref.npix}]"
        )
    if not math.isclose(cand.meta.pixel_arcmin, ref.meta.pixel_arcmin, rel_tol=1e-6):
        raise ValueError(
            f"{what}: {cand.path} has pixel_arcmin={cand.meta.pixel_arcmin}, the reference {ref.meta.pixel_arcmin}"
        )
    zc, zr = np.asarray(cand.meta.source_redshifts), np.asarray(ref.meta.source_redshifts)
    both = np.isfinite(zc) & np.isfinite(zr)
    if np.any(both & ~np.isclose(zc, zr, rtol=1e-6, atol=0)):
        warnings.append(f"{what} source_redshifts {zc.tolist()} differ from the reference {zr.tolist()}")
    if cand.meta.periodic != ref.meta.periodic:
        warnings.append(
            f"{what} periodic={cand.meta.periodic} differs from the reference "
            f"periodic={ref.meta.periodic}; both are measured as the reference "
            f"(periodic={ref.meta.periodic})"
        )


def store_record(st: MapStore, split: str, idx: np.ndarray) -> dict[str, Any]:
    """What summary.json says about an input store: path, selection and the provenance it carries."""
    m = st.meta
    return {
        "path": str(st.path.resolve()),
        "split": split,
        "n_maps_store": st.n,
        "n_maps_used": int(idx.size),
        "channels": st.channels,
        "npix": st.npix,
        "pixel_arcmin": m.pixel_arcmin,
        "source_redshifts": list(m.source_redshifts),
        "periodic": m.periodic,
        "kind": m.kind,
        "param_names": list(m.param_names),
        "created_by": dict(m.created_by),
        "extra": dict(m.extra),
    }


def batches(store: MapStore, idx: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """The maps ``idx`` of ``store`` in blocks of ``batch`` (float32 [b, C, H, W])."""
    for lo in range(0, idx.size, batch):
        yield store.read(idx[lo : lo + batch])


def _as_float(maps: Maps, dtype: Any) -> np.ndarray:
    """Maps as ``dtype`` (``None``: their own float dtype, float32 or float64), C order."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    arr = np.asarray(maps)
    if dtype is None:
        dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_float32(maps: Maps) -> np.ndarray:
    """Maps as the store holds them (float32, C order), so arrays and stores give the same numbers."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    return np.ascontiguousarray(maps, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# The SummaryConfig
# ---------------------------------------------------------------------------------------------------


def summary_config_for(
    options: MeasureOptions | Mapping[str, Any],
    meta: StoreMeta,
    reference_maps: Maps,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SummaryConfig:
    """The one :class:`SummaryConfig` for both sets, from the reference maps ``[N, C, H, W]`` in memory.

    Bins depend on the reference only: ν edges are in units of the smoothed shape-noise σ, or (no
    noise) of the reference maps' own σ after noise and smoothing, measured on the first
    ``bins.reference_sigma_maps`` maps with shape noise seeded by ``seed``. The border of non-periodic
    maps is 2 × the widest smoothing scale unless ``bins.border_arcmin`` says otherwise.

    Args:
        options: :class:`MeasureOptions`, or a mapping shaped like conf/validate.yaml (missing keys take
            its values).
        meta: the reference store's metadata (pixel scale, periodicity).
        reference_maps: the reference maps in the order they are measured (float32, as in a store).
        device: where the reference σ is measured.
        seed: seed of the shape noise behind that σ.
    """
    maps = reference_maps
    return _summary_config(MeasureOptions.from_config(options), meta, lambda k: _first(maps, k), device, seed)


def build_summary_config(
    cfg: MeasureOptions | Mapping[str, Any],
    reference: MapStore,
    ref_idx: np.ndarray,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SummaryConfig:
    """:func:`summary_config_for` of the maps ``ref_idx`` of ``reference`` (only the maps it needs are read)."""
    return _summary_config(
        MeasureOptions.from_config(cfg), reference.meta, lambda k: _first((reference, ref_idx), k), device, seed
    )


def _summary_config(
    opts: MeasureOptions,
    meta: StoreMeta,
    first_maps: Callable[[int], np.ndarray],
    device: torch.device | str,
    seed: int,
) -> SummaryConfig:
    scales = opts.smoothing_arcmin
    periodic = bool(meta.periodic)
    border = opts.bins.border_arcmin
    if border is None:
        border = 0.0 if periodic else 2.0 * max(scales)
    noise: dict[str, float] = {}
    if opts.noise.model == "survey":
        noise = {"sigma_e": float(opts.noise.sigma_e), "n_gal": float(opts.noise.n_gal)}
    sc = SummaryConfig(
        pixel_arcmin=meta.pixel_arcmin,
        smoothing_arcmin=scales,
        periodic=periodic,
        border_arcmin=float(border),
        ell_nbins=opts.bins.ell_nbins,
        cross=opts.bins.cross,
        bin_units=opts.bins.units,
        statistics=opts.statistics,
        **noise,
        **opts.bins.edges(),
    )
    if opts.needs_reference_sigma:  # ν edges in units of the reference maps' own σ
        dev = torch.device(device)
        sub = first_maps(max(2, opts.bins.reference_sigma_maps))
        gen = torch.Generator(device=dev).manual_seed(seed) if sc.sigma_e is not None else None
        sc = with_reference_sigma(torch.from_numpy(sub).to(dev), sc, generator=gen)
    return sc


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def _measure(
    blocks: Iterable[np.ndarray], config: SummaryConfig, seed: int, device: torch.device | str, progress: Any
) -> dict[str, np.ndarray]:
    """The one measuring loop: ``summarize`` block by block, with one noise generator for the whole set."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    parts: dict[str, list[np.ndarray]] = {}
    for maps in blocks:
        res = summarize(torch.from_numpy(maps).to(dev), config, generator=gen)
        for k, v in res.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy().astype(np.float64))
        if progress is not None:
            progress.update(maps.shape[0])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(batch_size)


def statistics_of(
    maps: Maps,
    config: SummaryConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Per-map statistics {name: float64 [N, F]} of maps ``[N, C, H, W]`` in memory.

    The maps are measured as ``dtype``: float32 by default, as a map store holds them (``None`` keeps
    their own float dtype); the shape noise (if any) comes from one torch generator seeded with ``seed`` and carried
    across batches, so every map gets its own realisation and the result equals
    :func:`compute_statistics` of the same maps in a store.
    """
    return _measure(_blocks(maps, _check_batch(batch_size), dtype), config, seed, device, None)


def compute_statistics(
    store: MapStore,
    idx: np.ndarray,
    config: SummaryConfig,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Any = None,
) -> dict[str, np.ndarray]:
    """:func:`statistics_of` the maps ``idx`` of ``store``, read in batches; ``progress`` is an optional
    tqdm bar to advance."""
    return _measure(_blocks((store, idx), _check_batch(batch_size), None), config, seed, device, progress)


def _blocks(maps: MapSet, batch: int, dtype: Any) -> Iterator[np.ndarray]:
    """The maps of a set in blocks of ``batch``: a store's as it holds them, an array's as ``dtype``."""
    if isinstance(maps, tuple):
        yield from batches(*maps, batch)
        return
    arr = _as_float(maps, dtype)
    for lo in range(0, arr.shape[0], batch):
        yield arr[lo : lo + batch]


def _first(maps: MapSet, k: int) -> np.ndarray:
    """The first ``k`` maps of a set as a store holds them (float32): what the reference σ is measured on."""
    if isinstance(maps, tuple):
        store, idx = maps
        return store.read(idx[:k])
    return _as_float32(maps[:k])


def measure_pair(
    reference: MapSet,
    candidate: MapSet,
    options: MeasureOptions,
    meta: StoreMeta,
    seeds: SeedStreams,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    dtype: Any = np.float32,
    progress: Any = None,
) -> tuple[SummaryConfig, dict[str, dict[str, np.ndarray]]]:
    """Both sets measured as validate measures them: the one SummaryConfig from the reference maps (``meta``:
    the reference's), then per-map statistics of each set with its own shape-noise stream.

    Returns the config and ``{"reference": stats, "candidate": stats}``. Maps in memory are measured as ``dtype``
    (``None``: their own float dtype); ``progress`` is an optional tqdm bar advanced over both sets.
    """
    batch = _check_batch(batch_size)
    config = _summary_config(options, meta, lambda k: _first(reference, k), device, seeds.sigma)
    stats = {
        "reference": _measure(_blocks(reference, batch, dtype), config, seeds.noise_reference, device, progress),
        "candidate": _measure(_blocks(candidate, batch, dtype), config, seeds.noise_candidate, device, progress),
    }
    return config, stats


def parameter_sets(store: MapStore, split: str) -> int:
    """How many distinct per-map parameter rows the maps of ``split`` have (0 without parameters)."""
    if not store.meta.param_names:
        return 0
    p = store.read_params(store.indices(split))
    return len(np.unique(p, axis=0)) if p.size else 0
