"""Validate emulator mocks against simulations.

``python -m lensflow.validate reference=sims.h5 candidate=mocks.h5 out=reports/NAME [key=value ...]``
(config ``conf/validate.yaml``; :func:`validate` is the same thing as a function of a composed config).

1. Select maps: the ``reference_split`` of the reference store (held-out simulations by default) and
   the ``candidate_split`` of the candidate store, optionally only maps with given parameters
   (``select``), at most ``max_maps`` of each (a seeded random subset).
2. Measure every statistic with :func:`lensflow.stats.summarize` under ONE :class:`SummaryConfig`:
   same smoothing, same bins, same noise model. Bin edges depend on the reference set only (ν edges in
   units of the smoothed shape-noise σ, or of the reference maps' own σ when there is no noise). Each
   set gets its own independent, seeded shape-noise stream, one realisation per map.
3. Compare bin by bin with :func:`lensflow.compare.compare` (tolerances, reasoning and the
   multiple-testing allowance are documented there).
4. Memorisation: nearest-neighbour distances of candidate maps to the training maps against those of
   held-out reference maps (:func:`lensflow.compare.memorization_check`).
5. Write into ``out``: ``summary.json`` (every metric, verdicts, both inputs' provenance),
   ``stats.h5`` (per-map statistics of both sets; layout in :func:`write_stats`), PNG figures
   (``stat_<name>.png`` mean ± σ with ratio and significance panels, ``corr_<name>.png`` correlation
   matrices, ``sample_maps.png``, ``nearest_neighbour.png``) and a self-contained ``report.html``;
   with ``notebook.execute=true`` also ``validation_report.ipynb`` / ``.html`` (papermill + nbconvert).

Exit code of ``main()``: 0 when every statistic and the memorisation check pass, 1 when one fails,
2 on bad input (one line ``error: ...`` on stderr).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import lensflow
from lensflow import compare as cmp
from lensflow.cli import precheck
from lensflow.mapstore import SPLITS, MapStore, open_store
from lensflow.provenance import provenance
from lensflow.stats.summary import STATISTICS, SummaryConfig, kappa_edges, summarize, summary_bins, with_reference_sigma

__all__ = [
    "validate",
    "main",
    "build_summary_config",
    "select_indices",
    "compute_statistics",
    "feature_groups",
    "write_stats",
    "read_stats",
    "load_report",
    "plot_statistic",
    "plot_correlation",
    "plot_sample_maps",
    "plot_nearest_neighbour",
    "verdict_table_html",
    "render_html",
    "execute_notebook",
]

_STATS_FILE = "stats.h5"
_SUMMARY_FILE = "summary.json"
_REPORT_FILE = "report.html"
_NOTEBOOK_NAME = "validation_report.ipynb"
_SCHEMA = "lensflow-validation/1"


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def _container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _store_record(st: MapStore, split: str, idx: np.ndarray) -> dict[str, Any]:
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


def _check_split(split: Any, what: str) -> str:
    s = "all" if split is None else str(split)
    if s not in (*SPLITS, "all"):
        raise ValueError(f"{what}: expected one of {(*SPLITS, 'all')}, got {split!r}")
    return s


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
    idx = store.indices(_check_split(split, f"{what} split"))
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


def _check_compatible(ref: MapStore, cand: MapStore, warnings: list[str], what: str = "candidate") -> None:
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


def _device(spec: Any) -> torch.device:
    s = str(spec or "auto")
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(s)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but CUDA is not available")
    return dev


def _seed_ints(seed: int, n: int) -> list[int]:
    ss = np.random.SeedSequence(int(seed))
    return [int(c.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for c in ss.spawn(n)]


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def build_summary_config(
    cfg: DictConfig | Mapping[str, Any],
    reference: MapStore,
    ref_idx: np.ndarray,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SummaryConfig:
    """The one :class:`SummaryConfig` used for both sets, with bins derived from the reference only."""
    c = _container(cfg)
    scales = c.get("smoothing_arcmin", [2.0])
    scales = [scales] if isinstance(scales, (int, float)) else list(scales)
    if not scales:
        raise ValueError("smoothing_arcmin: needs at least one scale (0 for unsmoothed maps)")
    stats = c.get("statistics", list(STATISTICS))
    if isinstance(stats, str):
        stats = [stats]
    unknown = sorted(set(stats) - set(STATISTICS))
    if unknown or not stats:
        raise ValueError(f"statistics: expected a non-empty subset of {list(STATISTICS)}, got {stats}")
    noise = c.get("noise") or {}
    model = str(noise.get("model", "none"))
    if model not in ("none", "survey"):
        raise ValueError(f"noise.model: expected 'none' or 'survey', got {model!r}")
    binned = any(k in stats for k in ("peaks", "minima", "pdf", "minkowski"))
    bins = dict(c.get("bins") or {})
    periodic = bool(reference.meta.periodic)
    border = bins.pop("border_arcmin", "auto")
    if border in (None, "auto"):
        border = 0.0 if periodic else 2.0 * max(float(s) for s in scales)
    units = bins.pop("units", "nu")
    nu_sigma = bins.pop("nu_sigma", "auto")
    n_sigma_maps = int(bins.pop("reference_sigma_maps", 256))
    if nu_sigma not in ("auto", "noise", "reference"):
        raise ValueError(f"bins.nu_sigma: expected auto, noise or reference, got {nu_sigma!r}")
    if nu_sigma == "auto":
        nu_sigma = "noise" if model == "survey" else "reference"
    if units == "nu" and nu_sigma == "noise" and model != "survey" and binned:
        raise ValueError("bins.nu_sigma: 'noise' needs noise.model=survey (there is no noise sigma otherwise)")
    d: dict[str, Any] = {
        "pixel_arcmin": reference.meta.pixel_arcmin,
        "smoothing_arcmin": tuple(float(s) for s in scales),
        "periodic": periodic,
        "border_arcmin": float(border),
        "ell_nbins": int(bins.pop("ell_nbins", 20)),
        "cross": bool(bins.pop("cross", True)),
        "bin_units": units,
        "statistics": tuple(stats),
    }
    if model == "survey":
        d["sigma_e"] = float(noise.get("sigma_e", 0.26))
        d["n_gal"] = float(noise.get("n_gal", 30.0))
    for k, v in bins.items():
        if v is not None:
            d[k] = v
    ref_sigma = units == "nu" and nu_sigma == "reference" and binned
    if ref_sigma:
        d["sigma_ref"] = (1.0,) * len(scales)  # placeholder, replaced from the reference maps below
    sc = SummaryConfig.from_dict(d)
    if ref_sigma:
        dev = torch.device(device)
        sub = reference.read(ref_idx[: max(2, n_sigma_maps)])
        gen = torch.Generator(device=dev).manual_seed(seed) if sc.sigma_e is not None else None
        sc = with_reference_sigma(torch.from_numpy(sub).to(dev), sc, generator=gen)
    return sc


def _batches(store: MapStore, idx: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for lo in range(0, idx.size, batch):
        yield store.read(idx[lo : lo + batch])


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
    """Per-map statistics {name: float64 [N, F]} of the maps ``idx`` of ``store``, in batches.

    The shape noise (if any) comes from one torch generator seeded with ``seed`` and carried across
    batches, so every map gets its own realisation. ``progress`` is an optional tqdm bar to advance.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    parts: dict[str, list[np.ndarray]] = {}
    for maps in _batches(store, idx, batch_size):
        res = summarize(torch.from_numpy(maps).to(dev), config, generator=gen)
        for k, v in res.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy().astype(np.float64))
        if progress is not None:
            progress.update(maps.shape[0])
    return {k: np.concatenate(v) for k, v in parts.items()}


def feature_groups(name: str, channels: int, cross: bool = True) -> list[str]:
    """Labels of the channel (or channel-pair) blocks that the features of a statistic come in
    (:func:`lensflow.stats.summarize` is channel-major; ``cl`` with ``cross`` holds channel pairs)."""
    if name == "cl" and cross and channels > 1:
        return [f"({i},{j})" for i in range(channels) for j in range(i, channels)]
    if channels > 1:
        return [f"channel {i}" for i in range(channels)]
    return [""]


# ---------------------------------------------------------------------------------------------------
# stats.h5
# ---------------------------------------------------------------------------------------------------


def write_stats(
    path: str | os.PathLike,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    bins: Mapping[str, np.ndarray],
    edges: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    indices: Mapping[str, np.ndarray] | None = None,
    distances: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write per-map statistics of both sets (atomically: temp file + rename).

    Layout: ``/reference/<name>`` and ``/candidate/<name>`` float64 [N, F] (names as
    :func:`lensflow.stats.summarize`, e.g. ``cl``, ``peaks@2.0arcmin``); ``/bins/<name>`` the x value of
    each column (ℓ, ν or κ, moment order); ``/edges/<name>`` κ bin edges where binned;
    ``/indices/{reference,candidate}`` map indices in the stores; ``/memorization/*`` nearest-neighbour
    distances (κ units). Root attrs: ``schema`` and JSON ``summary_config``, ``reference``,
    ``candidate``. Not a map store: it holds statistics, not κ maps.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = _SCHEMA
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(cmp.to_jsonable(v))
            for group, data in (
                ("reference", reference),
                ("candidate", candidate),
                ("bins", bins),
                ("edges", edges),
                ("indices", indices or {}),
                ("memorization", distances or {}),
            ):
                g = f.create_group(group)
                for k, v in data.items():
                    g.create_dataset(k, data=np.asarray(v))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``stats.h5`` written by :func:`write_stats`: a dict of its groups (name → array) and attrs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: statistics file not found")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not a readable HDF5 file") from None
    with f:
        if f.attrs.get("schema") != _SCHEMA:
            raise ValueError(f"{path}: not a lensflow validation statistics file (schema {f.attrs.get('schema')!r})")
        out: dict[str, Any] = {g: {k: f[g][k][()] for k in f[g]} for g in f}
        out["attrs"] = {k: json.loads(v) for k, v in f.attrs.items() if k != "schema"}
    return out


def load_report(folder: str | os.PathLike) -> dict[str, Any]:
    """``summary.json`` and ``stats.h5`` of a validation folder, for notebooks: ``{"summary", "stats", "dir"}``."""
    folder = Path(folder)
    sj = folder / _SUMMARY_FILE
    if not sj.is_file():
        raise ValueError(f"{folder}: no {_SUMMARY_FILE} (not a lensflow validation folder)")
    with open(sj) as fh:
        summary = json.load(fh)
    return {"summary": summary, "stats": read_stats(folder / _STATS_FILE), "dir": folder}


# ---------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot state, works under any backend)
# ---------------------------------------------------------------------------------------------------


def _figure(
    w: float,
    h: float,
    *,
    left: float = 0.8,
    right: float = 0.2,
    bottom: float = 0.55,
    top: float = 0.4,
    hspace: float = 0.1,
    wspace: float = 0.35,
) -> Any:
    """A Figure with fixed margins in inches (a layout engine would triple the drawing time)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, hspace=hspace, wspace=wspace
    )
    return fig


_XLABEL = {
    "cl": r"$\ell$",
    "peaks": r"$\nu$",
    "minima": r"$\nu$",
    "pdf": r"$\nu$",
    "v0": r"$\nu$",
    "v1": r"$\nu$",
    "v2": r"$\nu$",
    "moments": "moment",
}
_YLABEL = {
    "cl": r"$\ell(\ell+1)C_\ell/2\pi$",
    "peaks": "peaks per map",
    "minima": "minima per map",
    "pdf": "PDF",
    "v0": r"$V_0$",
    "v1": r"$V_1$ [arcmin$^{-1}$]",
    "v2": r"$V_2$ [arcmin$^{-2}$]",
    "moments": "value / reference σ",
}
_MOMENT_NAMES = ["mean", "var", "skew", "kurt"]


def _base(name: str) -> str:
    return name.split("@", 1)[0]


def plot_statistic(
    name: str,
    x: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray | None = None,
    result: Mapping[str, Any] | None = None,
    groups: Sequence[str] = ("",),
    units: str = "nu",
    labels: tuple[str, str] = ("reference", "candidate"),
) -> Any:
    """Mean ± σ of one statistic for one or two sets [N, F], with ratio and significance panels.

    ``result`` (a :func:`lensflow.compare.compare_statistic` result, JSON or numpy form) adds the
    allowed band to the ratio panel, the per-bin threshold to the z panel and marks failing bins.
    Returns a matplotlib ``Figure``.
    """
    from matplotlib.ticker import NullFormatter

    base = _base(name)
    ref = np.asarray(reference, dtype=float)
    cand = None if candidate is None else np.asarray(candidate, dtype=float)
    ng = len(groups)
    nb = ref.shape[1] // ng
    rows = 1 if cand is None else 3
    fig = _figure(3.6 * ng + 1.0, 2.6 + (2.2 if cand is not None else 0.0), left=0.95, hspace=0.12)
    axes = fig.subplots(rows, ng, squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1, 1.2][:rows]})
    logx = base == "cl"
    wfac = (lambda xx: xx * (xx + 1) / (2 * np.pi)) if base == "cl" else (lambda xx: np.ones_like(xx))

    def arr(key: str) -> np.ndarray | None:
        if result is None or key not in result:
            return None
        return np.asarray([np.nan if v is None else v for v in np.ravel(result[key])], dtype=float)

    allowed, passed, zthr = arr("mean_allowed"), result and result.get("mean_pass_bins"), None
    if result is not None:
        zthr = result.get("mean_sigma_per_bin")
    xlab = _XLABEL.get(base, "bin") if not (units == "kappa" and base not in ("cl", "moments")) else r"$\kappa$"
    for g in range(ng):
        sl = slice(g * nb, (g + 1) * nb)
        xx = np.asarray(x[sl], dtype=float)
        w = wfac(xx)
        mr, sr = ref[:, sl].mean(0), ref[:, sl].std(0, ddof=1)
        if base == "moments":
            # mean, variance, skewness and kurtosis differ by orders of magnitude: show each in units
            # of its reference scatter
            w = 1.0 / np.where(sr > 0, sr, 1.0)
        ax = axes[0, g]
        ax.fill_between(xx, (mr - sr) * w, (mr + sr) * w, color="C0", alpha=0.25, lw=0)
        ax.plot(xx, mr * w, "-", color="C0", label=f"{labels[0]} (N={ref.shape[0]})")
        if cand is not None:
            mc, scn = cand[:, sl].mean(0), cand[:, sl].std(0, ddof=1)
            ax.errorbar(
                xx,
                mc * w,
                yerr=scn * w,
                fmt="o",
                ms=3,
                color="C3",
                capsize=2,
                lw=1,
                label=f"{labels[1]} (N={cand.shape[0]})",
            )
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow panels
        vals = mr * w
        if base in ("cl", "pdf") and np.all(vals > 0):
            ax.set_yscale("log")
        if base == "moments":
            ax.set_xticks(xx, _MOMENT_NAMES[: len(xx)])
        ax.set_title(f"{name} {groups[g]}".strip(), fontsize=9)
        if g == 0:
            ax.set_ylabel(_YLABEL.get(base, name))
            ax.legend(fontsize=7)
        if cand is None:
            ax.set_xlabel(xlab)
            continue
        # ratio panel: only where the reference mean is clearly non-zero
        axr = axes[1, g]
        # only where the reference mean stands out of its scatter (a ratio near a zero crossing is noise)
        ok = (np.abs(mr) > 0.25 * sr) & (mr != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, mc / mr, np.nan)
            if allowed is not None:
                band = np.where(ok, allowed[sl] / np.abs(mr), np.nan)
                axr.fill_between(xx, 1 - band, 1 + band, color="0.85", lw=0, label="allowed")
        axr.axhline(1, color="k", lw=0.6)
        axr.plot(xx, ratio, "o-", ms=3, color="C3", lw=1)
        fin = np.abs(ratio[np.isfinite(ratio)] - 1)
        lim = float(np.clip(1.3 * (fin.max() if fin.size else 0.1), 0.05, 1.0))
        axr.set_ylim(1 - lim, 1 + lim)
        if g == 0:
            axr.set_ylabel("ratio", fontsize=8)
        # significance panel
        axz = axes[2, g]
        zz = arr("z_mean")
        if zz is None:
            se = np.sqrt(sr**2 / ref.shape[0] + scn**2 / cand.shape[0])
            with np.errstate(divide="ignore", invalid="ignore"):
                zz_g = (mc - mr) / se
        else:
            zz_g = zz[sl]
        if zthr is not None:
            axz.axhspan(-zthr, zthr, color="0.85", lw=0)
        axz.axhline(0, color="k", lw=0.6)
        bad = np.zeros(nb, bool) if passed is None else ~np.asarray(passed, dtype=bool)[sl]
        zz_plot = np.clip(np.nan_to_num(zz_g, nan=0.0, posinf=99, neginf=-99), -99, 99)
        axz.plot(xx[~bad], zz_plot[~bad], "o", ms=3, color="C2")
        axz.plot(xx[bad], zz_plot[bad], "x", ms=5, color="red", label="fails")
        if g == 0:
            axz.set_ylabel(r"$\Delta\mu$ / SE", fontsize=8)
        axz.set_xlabel(xlab)
    return fig


def plot_correlation(
    name: str,
    corr_reference: np.ndarray,
    corr_candidate: np.ndarray | None = None,
    corr: Mapping[str, Any] | None = None,
) -> Any:
    """Correlation matrices of one statistic side by side (reference, candidate, difference)."""
    from matplotlib.ticker import MaxNLocator

    cr = np.asarray(corr_reference, dtype=float)
    panels = [("reference", cr)]
    if corr_candidate is not None:
        cc = np.asarray(corr_candidate, dtype=float)
        panels += [("candidate", cc), ("candidate − reference", cc - cr)]
    fig = _figure(3.6 * len(panels) + 0.6, 3.4, left=0.6, top=0.55, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, m) in zip(axes, panels, strict=True):
        diff = title.startswith("candidate −")
        im = ax.imshow(m, cmap="RdBu_r", vmin=-0.5 if diff else -1, vmax=0.5 if diff else 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("bin")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("bin")
    sup = name
    if corr is not None and corr.get("rms") is not None:
        sup += (
            f": rms error {corr['rms']:.3f} (noise floor {corr['noise_floor']:.3f}, allowed "
            f"{corr.get('tolerance', float('nan')):.3f}), max {corr['max']:.3f}"
        )
    fig.suptitle(sup, fontsize=9)
    return fig


def plot_sample_maps(
    reference: np.ndarray,
    candidate: np.ndarray | None = None,
    pixel_arcmin: float = 1.0,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> Any:
    """Maps [n, C, H, W] (channel 0) of one or two sets on ONE colour scale (0.5–99.5 % of all pixels)."""
    sets = [(labels[0], np.asarray(reference))]
    if candidate is not None:
        sets.append((labels[1], np.asarray(candidate)))
    n = max(s[1].shape[0] for s in sets)
    allpix = np.concatenate([s[1][:, 0].ravel() for s in sets])
    vmin, vmax = np.percentile(allpix, [0.5, 99.5])
    fig = _figure(2.2 * n + 1.6, 2.3 * len(sets), left=0.4, right=1.2, bottom=0.15, top=0.4, wspace=0.05, hspace=0.05)
    axes = fig.subplots(len(sets), n, squeeze=False)
    side = reference.shape[-1] * pixel_arcmin / 60.0
    im = None
    for r, (lab, maps) in enumerate(sets):
        for i in range(n):
            ax = axes[r, i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= maps.shape[0]:
                ax.set_axis_off()
                continue
            im = ax.imshow(
                maps[i, 0],
                cmap="magma",
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                extent=(0, side, 0, side),
                interpolation="nearest",
            )
            if i == 0:
                ax.set_ylabel(lab)
    cax = fig.add_axes((1 - 1.0 / fig.get_figwidth(), 0.15, 0.15 / fig.get_figwidth(), 0.7))
    fig.colorbar(im, cax=cax, label=r"$\kappa$")
    fig.suptitle(f"{side:.2f} deg maps, channel 0, one colour scale", fontsize=9)
    return fig


def plot_nearest_neighbour(mem: Mapping[str, Any]) -> Any:
    """Histogram of nearest-neighbour distances to the training maps: candidates vs held-out maps."""
    dc = np.asarray(mem["candidate_distances"], dtype=float)
    dh = np.asarray(mem["heldout_distances"], dtype=float)
    fig = _figure(6.0, 3.6, top=0.45)
    ax = fig.subplots()
    hi = max(dc.max(initial=0), dh.max(initial=0)) * 1.05 or 1.0
    edges = np.linspace(0, hi, 41)
    ax.hist(dh, edges, histtype="stepfilled", alpha=0.4, color="C0", label=f"held-out (N={dh.size})")
    ax.hist(dc, edges, histtype="step", lw=1.5, color="C3", label=f"candidate (N={dc.size})")
    ax.axvline(mem["near_threshold"], color="k", ls="--", lw=1, label="near-copy threshold")
    ax.set_xlabel(r"L2 distance to the nearest training map [$\kappa$]")
    ax.set_ylabel("maps")
    ax.legend(fontsize=8)
    ax.set_title(
        f"memorisation: near copies {mem['near_fraction_candidate']:.1%} (held-out "
        f"{mem['near_fraction_heldout']:.1%}), median ratio {mem['median_ratio']:.2f}, "
        f"MW p={mem['mannwhitney_pvalue']:.1e}",
        fontsize=8,
    )
    return fig


def _save(fig: Any, path: Path, dpi: int) -> str:
    fig.savefig(path, dpi=dpi)
    return path.name


def _fname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def verdict_table_html(summary: Mapping[str, Any]) -> str:
    """The verdict table of a ``summary.json`` as an HTML ``<table>``."""
    head = (
        "<tr><th>statistic</th><th>bins</th><th>max |Δμ/μ|</th><th>max |Δμ|/SE (allowed)</th>"
        "<th>σ ratio</th><th>χ²/dof</th><th>p</th><th>corr rms (allowed)</th><th>mean</th><th>std</th>"
        "<th>corr</th><th>verdict</th></tr>"
    )
    rows = [head]

    def mark(v: Any) -> str:
        return "–" if v is None else ("✓" if v else "✗")

    for r in summary.get("table", []):
        ok = r["pass_pass"]
        chi = f"{_fmt(r['chi2'], '.1f')}/{r['dof']}" if r["chi2"] is not None else "n/a"
        rows.append(
            f"<tr class='{'pass' if ok else 'fail'}'><td>{html.escape(r['statistic'])}</td><td>{r['bins']}</td>"
            f"<td>{_fmt(r['max_abs_frac_error'], '.2%')}</td>"
            f"<td>{_fmt(r['max_abs_z'], '.2f')} ({_fmt(r['z_allowed'], '.2f')})</td>"
            f"<td>{_fmt(r['std_ratio_min'], '.3f')}–{_fmt(r['std_ratio_max'], '.3f')}</td>"
            f"<td>{chi}</td><td>{_fmt(r['pvalue'], '.1e')}</td>"
            f"<td>{_fmt(r['corr_rms'], '.3f')} ({_fmt(r['corr_tolerance'], '.3f')})</td>"
            f"<td>{mark(r['pass_mean'])}</td><td>{mark(r['pass_std'])}</td><td>{mark(r['pass_corr'])}</td>"
            f"<td><b>{'PASS' if ok else 'FAIL'}</b></td></tr>"
        )
    mem = summary.get("memorization") or {}
    if mem.get("status") == "done":
        ok = mem["pass"]
        rows.append(
            f"<tr class='{'pass' if ok else 'fail'}'><td>memorisation</td><td colspan='10'>near copies "
            f"{mem['near_fraction_candidate']:.1%} (held-out {mem['near_fraction_heldout']:.1%}), median "
            f"distance ratio {mem['median_ratio']:.3f}, Mann–Whitney p = {mem['mannwhitney_pvalue']:.1e}"
            f"</td><td><b>{'PASS' if ok else 'FAIL'}</b></td></tr>"
        )
    return "<table class='verdicts'>" + "\n".join(rows) + "</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table.verdicts{border-collapse:collapse;font-size:13px} table.verdicts td,table.verdicts th{border:1px solid #ccc;
padding:3px 7px;text-align:right} table.verdicts td:first-child{text-align:left} tr.fail{background:#fde0e0}
tr.pass{background:#e6f5e6} .banner{font-size:22px;padding:8px 14px;display:inline-block;border-radius:4px}
.banner.pass{background:#2e7d32;color:#fff} .banner.fail{background:#c62828;color:#fff}
img{max-width:100%} pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px} h3{margin-top:1.6em}
"""


def _img(folder: Path, name: str | None, embed: bool) -> str:
    if not name:
        return ""
    if embed:
        data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'/>"
    return f"<img alt='{html.escape(name)}' src='{html.escape(name)}'/>"


def render_html(summary: Mapping[str, Any], folder: str | os.PathLike, embed: bool = True) -> str:
    """A self-contained HTML report of a validation (figures from ``folder``, embedded as base64)."""
    folder = Path(folder)
    ok = summary["pass"]
    inp = summary["inputs"]
    figs = summary.get("figures", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lensflow validation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>lensflow validation report</h1>",
        f"<div class='banner {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</div>",
        "<p>reference: <code>{}</code> ({} split, {} maps) &nbsp; candidate: <code>{}</code> ({} split, {} maps)"
        "</p>".format(
            html.escape(inp["reference"]["path"]),
            inp["reference"]["split"],
            inp["reference"]["n_maps_used"],
            html.escape(inp["candidate"]["path"]),
            inp["candidate"]["split"],
            inp["candidate"]["n_maps_used"],
        ),
        f"<p>lensflow {html.escape(str(summary.get('lensflow_version')))}, {html.escape(summary.get('created', ''))}; "
        f"noise: {html.escape(json.dumps(summary['config'].get('noise')))}; smoothing σ "
        f"{summary['summary_config']['smoothing_arcmin']} arcmin</p>",
        "<h2>Verdicts</h2>",
        verdict_table_html(summary),
    ]
    if summary.get("failures"):
        parts.append(
            "<h3>Failures</h3><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in summary["failures"]) + "</ul>"
        )
    if summary.get("warnings"):
        parts.append(
            "<h3>Warnings</h3><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in summary["warnings"]) + "</ul>"
        )
    parts.append(
        "<p>Tolerances: " + html.escape(json.dumps(summary["tolerances"])) + ". Per-bin thresholds are "
        "raised for the number of bins of each statistic (Šidák); the std and correlation tolerances "
        "are widened by the sampling noise of the comparison (see <code>lensflow.compare</code>).</p>"
    )
    parts.append("<h2>Sample maps</h2>" + _img(folder, figs.get("sample_maps"), embed))
    mem = summary.get("memorization") or {}
    parts.append("<h2>Memorisation</h2>")
    if mem.get("status") == "done":
        parts.append(_img(folder, figs.get("nearest_neighbour"), embed))
    else:
        parts.append(f"<p>{html.escape(str(mem.get('note', 'not run')))}</p>")
    parts.append("<h2>Statistics</h2>")
    for name in summary["statistics"]:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_img(folder, figs.get("statistics", {}).get(name), embed))
        parts.append(_img(folder, figs.get("correlations", {}).get(name), embed))
    prov = {k: {kk: inp[k].get(kk) for kk in ("path", "kind", "created_by", "extra")} for k in inp}
    parts.append(
        "<h2>Provenance</h2><details><summary>inputs</summary><pre>"
        + html.escape(json.dumps(prov, indent=1))
        + "</pre></details>"
    )
    parts.append(
        "<details><summary>this validation</summary><pre>"
        + html.escape(json.dumps(summary.get("provenance"), indent=1))
        + "</pre></details>"
    )
    parts.append(
        "<details><summary>statistics configuration</summary><pre>"
        + html.escape(json.dumps(summary.get("summary_config"), indent=1))
        + "</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Notebook
# ---------------------------------------------------------------------------------------------------


def _default_notebook() -> Path:
    return Path(lensflow.__file__).resolve().parent.parent / "notebooks" / _NOTEBOOK_NAME


def _notebook_ready(notebook: str | os.PathLike | None) -> Path:
    nb_path = Path(notebook) if notebook else _default_notebook()
    if not nb_path.is_file():
        raise ValueError(f"notebook.path: {nb_path} not found")
    try:
        import nbconvert  # noqa: F401
        import papermill  # noqa: F401
    except ImportError as e:
        raise ValueError(f"notebook.execute: needs papermill and nbconvert (pip install lensflow[dev]): {e}") from None
    return nb_path


def execute_notebook(
    folder: str | os.PathLike, notebook: str | os.PathLike | None = None, timeout: int = 600
) -> dict[str, str]:
    """Run the report notebook on a validation folder with papermill and export it to HTML (nbconvert).

    Writes ``validation_report.ipynb`` and ``validation_report.html`` into ``folder``.
    """
    folder = Path(folder).resolve()
    nb_path = _notebook_ready(notebook)
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out_nb = folder / _NOTEBOOK_NAME
    pm.execute_notebook(
        str(nb_path),
        str(out_nb),
        parameters={"summary_dir": str(folder)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(folder),
        execution_timeout=int(timeout),
        log_output=False,
    )
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(out_nb, as_version=4))
    out_html = out_nb.with_suffix(".html")
    out_html.write_text(body, encoding="utf-8")
    return {"notebook": out_nb.name, "notebook_html": out_html.name}


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def _tqdm(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="map", disable=not enabled, file=sys.stderr, leave=False)


def _memorization(
    c: Mapping[str, Any],
    ref: MapStore,
    ref_path: Path,
    ref_split: str,
    ref_idx: np.ndarray,
    cand: MapStore,
    cand_idx: np.ndarray,
    device: torch.device,
    progress: bool,
    warnings: list[str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the memorisation check if asked/possible. Returns (record for summary.json, training record)."""
    m = dict(c.get("memorization") or {})
    enabled = m.pop("enabled", "auto")
    if enabled not in (True, False, "auto"):
        raise ValueError(f"memorization.enabled: expected true, false or auto, got {enabled!r}")
    if enabled is False:
        return {"status": "skipped", "pass": None, "note": "memorization.enabled=false"}, None
    train_path = m.pop("training", None)
    train_split = _check_split(m.pop("training_split", "train"), "memorization.training_split")
    max_maps = m.pop("max_maps", 500)
    batch = int(m.pop("batch_size", 256))
    dihedral = bool(m.pop("dihedral", False))
    tol = cmp.MemorizationTolerances.from_mapping(m)
    same = train_path is None or Path(train_path).resolve() == ref_path.resolve()
    tstore = ref if same else open_store(train_path)
    if not same:
        _check_compatible(ref, tstore, warnings, what="memorization.training")
    reason = None
    if same and (train_split == ref_split or "all" in (train_split, ref_split)):
        reason = (
            f"the held-out maps (reference split {ref_split!r}) overlap the training maps (split "
            f"{train_split!r} of the same store)"
        )
    tidx = tstore.indices(train_split)
    if reason is None and tidx.size == 0:
        reason = f"{tstore.path} has no maps in split {train_split!r}"
    if reason is not None:
        if enabled is True:
            raise ValueError(f"memorization: {reason}; set memorization.training / training_split")
        return {"status": "skipped", "pass": None, "note": f"skipped: {reason}"}, None
    k = None if max_maps is None else int(max_maps)
    ci, hi = cand_idx[:k], ref_idx[:k]
    if hi.size < 2:
        raise ValueError("memorization: needs at least 2 held-out reference maps")
    bar = _tqdm(tidx.size, "memorization", progress)

    def stream() -> Iterator[np.ndarray]:
        for maps in _batches(tstore, tidx, batch):
            bar.update(maps.shape[0])
            yield maps

    t0 = time.time()
    res = cmp.memorization_check(
        cand.read(ci), stream(), ref.read(hi), tol, chunk=batch, device=device, dihedral=dihedral
    )
    bar.close()
    res["status"] = "done"
    res["seconds"] = time.time() - t0
    res["training_path"] = str(tstore.path.resolve())
    res["training_split"] = train_split
    res["n_training"] = int(tidx.size)
    res["candidate_nearest_training_index"] = tidx[res.pop("candidate_nearest_index")]
    return res, _store_record(tstore, train_split, tidx)


def validate(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Validate a candidate store against a reference store (see the module docstring and conf/validate.yaml).

    Returns the summary (as written to ``summary.json``) with ``pass`` and ``out`` (the output folder).
    Raises ``ValueError`` (one line naming the argument or file) on bad input.
    """
    t_start = time.time()
    c = _container(cfg)
    for key in ("reference", "candidate", "out"):
        if c.get(key) in (None, "", "???"):
            raise ValueError(f"{key}: required (e.g. {key}=PATH)")
    ref_path, cand_path, out = Path(c["reference"]), Path(c["candidate"]), Path(c["out"])
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    if (out / _SUMMARY_FILE).exists() and not c.get("overwrite", False):
        raise FileExistsError(f"out: {out} already holds a validation; pass overwrite=true to replace it")
    tol = cmp.Tolerances.from_mapping(c.get("tolerances"))
    ref_split = _check_split(c.get("reference_split", "test"), "reference_split")
    cand_split = _check_split(c.get("candidate_split", "all"), "candidate_split")
    seed = int(c.get("seed", 0))
    device = _device(c.get("device", "auto"))
    progress = bool(c.get("progress", True))
    batch = int(c.get("batch_size", 128))
    fig_opts = dict(c.get("figures") or {})
    nb_opts = dict(c.get("notebook") or {})
    if nb_opts.get("execute", False):
        _notebook_ready(nb_opts.get("path"))  # fail before the work, not after it
    warnings: list[str] = []

    ref, cand = open_store(ref_path), open_store(cand_path)
    with ref, cand:
        _check_compatible(ref, cand, warnings)
        s_sub_r, s_sub_c, s_noise_r, s_noise_c, s_sigma = _seed_ints(seed, 5)
        select = c.get("select") or {}
        max_maps = c.get("max_maps")
        ref_idx = select_indices(ref, ref_split, select, max_maps, np.random.default_rng(s_sub_r), "reference")
        cand_idx = select_indices(cand, cand_split, select, max_maps, np.random.default_rng(s_sub_c), "candidate")
        if ref_path.resolve() == cand_path.resolve() and np.intersect1d(ref_idx, cand_idx).size:
            warnings.append("reference and candidate share maps (same store, overlapping splits)")
        for what, st, sp in (("reference", ref, ref_split), ("candidate", cand, cand_split)):
            if st.meta.param_names and not select:
                p = st.read_params(st.indices(sp))
                nuniq = len(np.unique(p, axis=0)) if p.size else 0
                if nuniq > 1:
                    warnings.append(
                        f"{what} maps come from {nuniq} parameter sets and are pooled; use select.* to compare one"
                    )
        sc = build_summary_config(c, ref, ref_idx, device, s_sigma)

        t0 = time.time()
        bar = _tqdm(ref_idx.size + cand_idx.size, "statistics", progress)
        s_ref = compute_statistics(ref, ref_idx, sc, batch_size=batch, device=device, seed=s_noise_r, progress=bar)
        s_cand = compute_statistics(cand, cand_idx, sc, batch_size=batch, device=device, seed=s_noise_c, progress=bar)
        bar.close()
        t_stats = time.time() - t0
        result = cmp.compare(s_ref, s_cand, tol)

        mem, train_rec = _memorization(c, ref, ref_path, ref_split, ref_idx, cand, cand_idx, device, progress, warnings)
        n_samp = int(fig_opts.get("sample_maps", 4))
        samples = (ref.read(ref_idx[:n_samp]), cand.read(cand_idx[:n_samp])) if n_samp > 0 else None
        inputs = {
            "reference": _store_record(ref, ref_split, ref_idx),
            "candidate": _store_record(cand, cand_split, cand_idx),
        }
        if train_rec is not None:
            inputs["training"] = train_rec
        channels, npix = ref.channels, ref.npix

    out.mkdir(parents=True, exist_ok=True)
    bins = summary_bins(sc, npix, channels)
    edges = kappa_edges(sc)
    # -- figures
    dpi = int(fig_opts.get("dpi", 110))
    figures: dict[str, Any] = {"statistics": {}, "correlations": {}}
    draw = bool(fig_opts.get("enabled", True))
    for name, r in result["statistics"].items() if draw else ():
        groups = feature_groups(name, channels, sc.cross)
        fig = plot_statistic(name, bins[name], s_ref[name], s_cand[name], r, groups, sc.bin_units)
        figures["statistics"][name] = _save(fig, out / f"stat_{_fname(name)}.png", dpi)
        if r["corr"]["rms"] is not None:
            fig = plot_correlation(name, r["corr"]["corr_reference"], r["corr"]["corr_candidate"], r["corr"])
            figures["correlations"][name] = _save(fig, out / f"corr_{_fname(name)}.png", dpi)
    if samples is not None and draw:
        figures["sample_maps"] = _save(
            plot_sample_maps(*samples, pixel_arcmin=sc.pixel_arcmin), out / "sample_maps.png", dpi
        )
    if mem.get("status") == "done" and draw:
        figures["nearest_neighbour"] = _save(plot_nearest_neighbour(mem), out / "nearest_neighbour.png", dpi)

    # -- verdicts
    verdicts = {name: r["verdict"]["pass"] for name, r in result["statistics"].items()}
    failures = list(result["failures"])
    if mem.get("status") == "done":
        verdicts["memorization"] = mem["pass"]
        failures += mem["failures"]
    passed = all(verdicts.values())
    dist = (
        {"candidate_distances": mem["candidate_distances"], "heldout_distances": mem["heldout_distances"]}
        if mem.get("status") == "done"
        else None
    )
    mem_json = {k: v for k, v in mem.items() if k not in ("candidate_distances", "heldout_distances")}

    write_stats(
        out / _STATS_FILE,
        s_ref,
        s_cand,
        bins,
        edges,
        {"summary_config": sc.to_dict(), "reference": inputs["reference"], "candidate": inputs["candidate"]},
        indices={"reference": ref_idx, "candidate": cand_idx},
        distances=dist,
    )
    summary: dict[str, Any] = {
        "schema": _SCHEMA,
        "pass": passed,
        "exit_code": 0 if passed else 1,
        "verdicts": verdicts,
        "failures": failures,
        "warnings": warnings,
        "table": cmp.summary_rows(result),
        "statistics": result["statistics"],
        "memorization": mem_json,
        "tolerances": result["tolerances"],
        "summary_config": sc.to_dict(),
        "bins": bins,
        "kappa_edges": edges,
        "inputs": inputs,
        "config": c,
        "figures": figures,
        "files": {"summary": _SUMMARY_FILE, "stats": _STATS_FILE, "report": _REPORT_FILE},
        "provenance": provenance(c),
        "lensflow_version": lensflow.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings": {"statistics_s": t_stats, "total_s": None},
    }
    summary = cmp.to_jsonable(summary)
    summary["timings"]["total_s"] = time.time() - t_start
    _write_json(out / _SUMMARY_FILE, summary)
    (out / _REPORT_FILE).write_text(render_html(summary, out), encoding="utf-8")
    if nb_opts.get("execute", False):
        try:
            summary["files"].update(execute_notebook(out, nb_opts.get("path"), int(nb_opts.get("timeout", 600))))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken notebook run must not hide the verdict
            summary["warnings"].append(f"notebook execution failed: {e.__class__.__name__}: {_one_line(e)[:500]}")
            print(f"warning: {summary['warnings'][-1]}", file=sys.stderr)
        _write_json(out / _SUMMARY_FILE, summary)
    summary["out"] = str(out)
    return summary


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, allow_nan=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, OmegaConfBaseException)
_STATE: dict[str, int] = {}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def _run(cfg: DictConfig) -> int:
    try:
        summary = validate(cfg)
    except _BAD_INPUT as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a crash must not read as "validation failed" (exit 1)
        traceback.print_exc()
        print(f"error: internal error: {e.__class__.__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    verdict = "PASS" if summary["pass"] else "FAIL"
    print(
        f"{verdict}: {sum(summary['verdicts'].values())}/{len(summary['verdicts'])} checks pass; report "
        f"{Path(summary['out']) / _REPORT_FILE}",
        file=sys.stderr,
    )
    for f in summary["failures"]:
        print(f"  {f}", file=sys.stderr)
    return summary["exit_code"]


def _hydra_entry() -> Any:
    import hydra

    @hydra.main(config_path="pkg://lensflow.conf", config_name="validate", version_base="1.3")
    def _hydra_main(cfg: DictConfig) -> None:
        _STATE["code"] = _run(cfg)

    return _hydra_main


def _select_overrides(args: list[str]) -> list[str]:
    """``select.NAME=value`` adds a key to the empty ``select`` node, which Hydra spells ``+select.NAME``."""
    return [f"+{a}" if a.startswith("select.") else a for a in args]


def main() -> None:
    """``python -m lensflow.validate key=value ...``: exit 0 pass, 1 fail, 2 bad input."""
    sys.argv = [sys.argv[0], *_select_overrides(sys.argv[1:])]
    precheck("validate", sys.argv[1:])
    _STATE.clear()
    try:
        _hydra_entry()()
    except SystemExit as e:
        if "code" not in _STATE and e.code not in (0, None):
            sys.exit(2)  # Hydra rejected the command line and has said why
        raise
    sys.exit(_STATE.get("code", 0))


if __name__ == "__main__":
    main()
