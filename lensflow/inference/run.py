"""``infer(cfg)``: the posterior of the emulator's parameters given maps, on a grid, against the exact and C_ℓ ones.

For each map (or all maps jointly) the conditional emulator's field-level log-likelihood ``log p(κ | θ)`` is
evaluated on a regular grid over the prior box (uniform prior; by default the emulator's training box) and
summarised (:class:`~lensflow.inference.posterior.GridPosterior`). When the maps come from a built-in flat
simulator, the same posterior from the simulator's exact likelihood is computed beside it, and so is the
posterior of a Gaussian likelihood of the binned C_ℓ (exact mean at every θ, covariance from simulations at the
box centre): per map and on average, the emulator's shift in exact-posterior σ, the width ratio, the coverage
of the credible regions, and the figure-of-merit ratio field-level / C_ℓ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.atomic import write_json, write_text
from lensflow._util.checks import check_bool, check_choice, check_int, check_optional_int
from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow._util.plain import merge, to_plain
from lensflow.emulator import Emulator
from lensflow.inference.likelihoods import ClLikelihood, emulator_loglike, exact_loglike
from lensflow.inference.posterior import GridPosterior, ParameterGrid, refine_loglike
from lensflow.mapstore import MapStore, open_store
from lensflow.provenance import provenance
from lensflow.report.figures import save_figure
from lensflow.report.posterior import corner_figure, posterior_page
from lensflow.sims.truth import StoreTruth
from lensflow.stats import SummaryConfig

__all__ = ["DEFAULTS", "InferRequest", "infer"]

log = get_logger(__name__)
_SPLITS = ("train", "val", "test", "all")

#: Every key of an infer config and its default (the ``lensflow/infer`` node of ``conf/infer.yaml``);
#: ``ckpt``, ``maps`` and ``out`` are required.
DEFAULTS: dict[str, Any] = {
    "ckpt": "???",  # checkpoint of a conditional emulator (lensflow.train with data.cond)
    "maps": "???",  # map store of the maps to analyse
    "out": "???",  # output folder
    "split": "all",  # train | val | test | all
    "max_maps": 100,  # the first maps of the split; null = all
    "joint": False,  # also one joint posterior of all the maps
    # The uniform prior's box per parameter, e.g. prior.sigma_8=[0.75,0.85]; empty = the emulator's training box
    # (read from its training store); a box outside the training box is refused.
    "prior": {},
    "grid_points": 25,  # grid nodes per parameter (the exact likelihood costs ~1-5 s per node for 64² maps)
    "refine": 8,  # summarise on a grid with 8x the cells: log-likelihoods cubic-spline interpolated (1: off)
    "exact": "auto",  # the exact posterior: auto (when the maps' store is a built-in flat simulation) | true | false
    "cl": "auto",  # the binned-C_ell Gaussian posterior (needs the exact simulator for its mean): auto | true | false
    "cl_fiducial_maps": 2000,  # simulations at the box centre for the C_ell covariance
    "batch_size": 256,  # maps per emulator forward pass
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "seed": 0,
    "overwrite": False,
    "progress": True,
    "figures": {
        "corner_maps": 4,  # corner plots of the first maps (and of the joint posterior)
        "dpi": 110,
    },
}


@dataclass(frozen=True)
class InferRequest:
    """An ``infer`` run, typed and checked once (conf/infer.yaml describes every field)."""

    ckpt: Path
    maps: Path
    split: str
    max_maps: int | None
    joint: bool
    prior: dict[str, tuple[float, float]]
    grid_points: int
    refine: int
    exact: str
    cl: str
    cl_fiducial_maps: int
    batch_size: int
    device: str
    seed: int
    out: Path
    overwrite: bool
    progress: bool
    corner_maps: int
    dpi: int
    plain: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Any) -> InferRequest:
        """The request of a composed ``infer`` config or a mapping of its keys (those left out take
        :data:`DEFAULTS`); one line naming the key on bad input."""
        given = to_plain(cfg)
        if not isinstance(given, dict):
            raise ValueError(f"infer config: expected a mapping, got {type(cfg).__name__}")
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"infer: unknown keys {unknown}")
        c = merge(DEFAULTS, given)
        for key in ("ckpt", "maps", "out"):
            if c.get(key) in (None, "", "???"):
                raise ValueError(f"{key}: required (e.g. {key}=PATH)")
        prior = {}
        for name, box in (c.get("prior") or {}).items():
            if not (isinstance(box, (list, tuple)) and len(box) == 2):
                raise ValueError(f"prior.{name}: expected [lo, hi], got {box!r}")
            prior[str(name)] = (float(box[0]), float(box[1]))
        # checked here, not after the likelihoods: a cubic spline needs 4 nodes per axis
        if check_int("refine", c["refine"], 1) > 1 and check_int("grid_points", c["grid_points"], 3) < 4:
            raise ValueError("refine: refine > 1 needs grid_points >= 4 (a cubic spline); pass refine=1 or more points")
        return cls(
            ckpt=Path(str(c["ckpt"])),
            maps=Path(str(c["maps"])),
            split=check_choice("split", c["split"], _SPLITS),
            max_maps=check_optional_int("max_maps", c["max_maps"], 1),
            joint=check_bool("joint", c["joint"]),
            prior=prior,
            grid_points=check_int("grid_points", c["grid_points"], 3),
            refine=check_int("refine", c["refine"], 1),
            exact=check_choice("exact", str(c["exact"]).lower(), ("auto", "true", "false")),
            cl=check_choice("cl", str(c["cl"]).lower(), ("auto", "true", "false")),
            cl_fiducial_maps=check_int("cl_fiducial_maps", c["cl_fiducial_maps"], 10),
            batch_size=check_int("batch_size", c["batch_size"], 1),
            device=str(c["device"]),
            seed=check_int("seed", c["seed"], 0),
            out=Path(str(c["out"])),
            overwrite=check_bool("overwrite", c["overwrite"]),
            progress=check_bool("progress", c["progress"]),
            corner_maps=check_int("figures.corner_maps", c["figures"]["corner_maps"], 0),
            dpi=check_int("figures.dpi", c["figures"]["dpi"], 10),
            plain=c,
        )


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def _load_emulator(req: InferRequest) -> Emulator:
    emu = Emulator.load(req.ckpt, device=req.device)
    if not emu.param_names:
        raise ValueError(
            f"ckpt: {req.ckpt} is an unconditional emulator; lensflow.infer needs one conditioned on the parameters "
            "to infer (e.g. trained with +experiment=kappa_cond_cpu)"
        )
    return emu


def _check_maps(store: MapStore, emu: Emulator) -> None:
    c, h, _ = emu.map_shape
    pix, want = store.meta.pixel_arcmin, emu.meta.pixel_arcmin
    if store.channels != c or store.npix != h or not math.isclose(pix, want, rel_tol=1e-6):
        raise ValueError(
            f"maps: {store.path} holds {store.channels}x{store.npix}² maps of {pix:g} arcmin, but the emulator was "
            f"trained on {c}x{h}² maps of {want:g} arcmin"
        )


def training_box(emu: Emulator) -> dict[str, tuple[float, float]] | None:
    """The range of each conditioning parameter over the emulator's training split (``None`` if unknown)."""
    box = emu.training_box
    return None if box is None else box.as_dict()


def prior_box(req: InferRequest, emu: Emulator) -> dict[str, tuple[float, float]]:
    """The uniform prior's box: ``prior`` when given (inside the training box), else the training box."""
    box = training_box(emu)
    unknown = sorted(set(req.prior) - set(emu.param_names))
    if unknown:
        raise ValueError(f"prior: {unknown} are not parameters of the emulator ({list(emu.param_names)})")
    out = {}
    for name in emu.param_names:
        if name in req.prior:
            lo, hi = req.prior[name]
            if box is not None:
                blo, bhi = box[name]
                tol = 1e-6 * max(1.0, abs(bhi))
                if lo < blo - tol or hi > bhi + tol:
                    raise ValueError(
                        f"prior.{name}: [{lo:g}, {hi:g}] is outside the emulator's training box [{blo:g}, {bhi:g}]; "
                        "an emulator says nothing reliable outside it"
                    )
            out[name] = (lo, hi)
        elif box is not None:
            out[name] = box[name]
        else:
            raise ValueError(
                f"prior.{name}: the training store {emu.store} is not readable here, so give the prior box "
                f"(prior.{name}=[lo,hi])"
            )
    return out


def _truths(store: MapStore, idx: np.ndarray, names: tuple[str, ...]) -> np.ndarray | None:
    """The true θ of each map: its ``/params``, or the store's cosmology; ``None`` when unknown."""
    if set(names) <= set(store.meta.param_names):
        p = store.read_params(idx)
        cols = [list(store.meta.param_names).index(k) for k in names]
        return p[:, cols].astype(np.float64)
    cosmo = (store.meta.extra or {}).get("cosmology") or {}
    if all(k in cosmo for k in names):
        return np.tile(np.array([float(cosmo[k]) for k in names]), (idx.size, 1))
    return None


# ---------------------------------------------------------------------------------------------------
# Posteriors and their comparison
# ---------------------------------------------------------------------------------------------------


def _exact_and_cl(
    req: InferRequest, store: MapStore, maps: np.ndarray, grid: ParameterGrid
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """Exact and C_ℓ log-likelihoods [n, G] when the maps' simulator is known (``auto``), else ``None``."""
    info: dict[str, Any] = {}
    if req.exact == "false":
        return None, None, {"exact": "off"}
    try:
        truth = StoreTruth(store.meta, str(store.path))
    except ValueError as e:
        if req.exact == "true":
            raise
        return None, None, {"exact": f"not available: {e}"}
    names = grid.names

    def at(theta: np.ndarray):
        return truth.simulator(dict(zip(names, (float(t) for t in theta), strict=True)))

    cl = None
    if req.cl != "false":
        centre = np.array([(a + b) / 2 for a, b in zip(grid.lo, grid.hi, strict=True)])
        sim = at(centre)
        config = SummaryConfig.from_dict(
            {"pixel_arcmin": store.meta.pixel_arcmin, "statistics": ("cl",), "periodic": store.meta.periodic}
        )
        fiducial = sim.generate(req.cl_fiducial_maps, seed=[req.seed, 99])
        cl = ClLikelihood(config, fiducial)
        info["cl_covariance"] = {"theta": centre.tolist(), "maps": req.cl_fiducial_maps, "hartlap": cl.hartlap}
    t0 = time.time()
    exact = exact_loglike(
        at, maps, grid.nodes(), show_progress=req.progress, on_simulator=None if cl is None else cl.add_node
    )
    info["exact_seconds"] = time.time() - t0
    return exact, None if cl is None else cl.loglike(maps, grid.nodes().shape[0]), info


def _compare(emu: GridPosterior, ref: GridPosterior | None) -> dict[str, Any]:
    if ref is None:
        return {}
    sd = np.sqrt(np.diag(ref.cov()))
    return {
        "shift_sigma": ((emu.mean() - ref.mean()) / sd).tolist(),
        "width_ratio": (np.sqrt(np.diag(emu.cov())) / sd).tolist(),
    }


def _coverage(cred: list[float]) -> dict[str, Any]:
    c = np.asarray([x for x in cred if x is not None], dtype=float)
    if c.size == 0:
        return {}
    out = {"n": int(c.size)}
    for q in (0.68, 0.95):
        f = float((c <= q).mean())
        out[f"coverage{int(q * 100)}"] = f
        out[f"coverage{int(q * 100)}_se"] = math.sqrt(q * (1 - q) / c.size)
    return out


def _aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {"maps": len(records)}
    for kind in ("emulator", "exact", "cl"):
        cred = [r[kind]["credibility_truth"] for r in records if r.get(kind) and "credibility_truth" in r[kind]]
        for k, v in _coverage(cred).items():
            agg[f"{kind}_{k}"] = v
    shifts = np.array([r["shift_sigma"] for r in records if "shift_sigma" in r])
    if shifts.size:
        agg["mean_shift_sigma"] = shifts.mean(axis=0).tolist()
        agg["mean_abs_shift_sigma"] = np.abs(shifts).mean(axis=0).tolist()
        widths = np.array([r["width_ratio"] for r in records])
        agg["width_ratio_geomean"] = np.exp(np.log(widths).mean(axis=0)).tolist()
    for key in ("fom_ratio_field_cl", "fom_ratio_exact_cl"):
        vals = np.array([r[key] for r in records if r.get(key) is not None])
        if vals.size:
            agg[f"{key}_mean"] = float(vals.mean())
            agg[f"{key}_median"] = float(np.median(vals))
    return agg


def _record(index: int, truth: np.ndarray | None, posts: Mapping[str, GridPosterior]) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": int(index), "truth": None if truth is None else truth.tolist()}
    for kind, post in posts.items():
        rec[kind] = post.summary()
        if truth is not None:
            rec[kind]["credibility_truth"] = post.credibility(truth)
    rec.update(_compare(posts["emulator"], posts.get("exact")))
    if "cl" in posts:
        rec["fom_ratio_field_cl"] = posts["emulator"].figure_of_merit() / posts["cl"].figure_of_merit()
        if "exact" in posts:
            rec["fom_ratio_exact_cl"] = posts["exact"].figure_of_merit() / posts["cl"].figure_of_merit()
    return rec


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def infer(cfg: Any) -> dict[str, Any]:
    """Posteriors of the emulator's parameters given the maps of a store (see the module docstring).

    Writes ``out/posterior.json``, corner plots and ``out/index.html``; returns the summary.
    """
    req = cfg if isinstance(cfg, InferRequest) else InferRequest.from_config(cfg)
    with target_lock(req.out):  # one run per output folder at a time
        return _infer(req)


def _infer(req: InferRequest) -> dict[str, Any]:
    t_start = time.time()
    if (req.out / "posterior.json").exists() and not req.overwrite:
        raise FileExistsError(f"out: {req.out} already holds a posterior; pass overwrite=true to replace it")
    emu = _load_emulator(req)
    box = prior_box(req, emu)
    names = tuple(emu.param_names)
    grid = ParameterGrid(
        names, tuple(box[k][0] for k in names), tuple(box[k][1] for k in names), (req.grid_points,) * len(names)
    )
    with open_store(req.maps) as store:
        _check_maps(store, emu)
        idx = store.indices(req.split)[: req.max_maps]
        if idx.size == 0:
            raise ValueError(f"maps: the {req.split} split of {req.maps} holds no maps")
        maps = store.read(idx)  # validated on read: NaN/Inf maps give one line naming the store
        truths = _truths(store, idx, names)
        t0 = time.time()
        ll_emu = emulator_loglike(emu, maps, grid.nodes(), batch_size=req.batch_size, show_progress=req.progress)
        emu_seconds = time.time() - t0
        ll_exact, ll_cl, info = _exact_and_cl(req, store, maps, grid)
    lls = {"emulator": ll_emu, "exact": ll_exact, "cl": ll_cl}
    lls = {k: v for k, v in lls.items() if v is not None}
    coarse = grid
    for k in lls:
        grid, lls[k] = refine_loglike(coarse, lls[k], req.refine)
    records = []
    for i in range(idx.size):
        posts = {k: GridPosterior(grid, v[i]) for k, v in lls.items()}
        records.append(_record(int(idx[i]), None if truths is None else truths[i], posts))
    joint = None
    if req.joint:
        posts = {k: GridPosterior(grid, v.sum(axis=0)) for k, v in lls.items()}
        common = truths[0] if truths is not None and np.allclose(truths, truths[0]) else None
        joint = _record(-1, common, posts)
    summary = {
        "param_names": list(names),
        "prior": {k: list(v) for k, v in box.items()},
        "grid": {"points": list(coarse.points), "refine": req.refine, "summarised_on": list(grid.points)},
        "maps_store": str(req.maps),
        "split": req.split,
        "maps": records,
        "joint": joint,
        "aggregate": _aggregate(records),
        "timings": {
            "emulator_seconds_per_posterior": emu_seconds / idx.size,
            "exact_seconds_per_node": info.get("exact_seconds", 0.0) / coarse.nodes().shape[0]
            if ll_exact is not None
            else None,
            "total_s": None,
        },
        "notes": {k: v for k, v in info.items() if k != "exact_seconds"},
        "config": req.plain,
        "provenance": provenance(req.plain),
    }
    _write(req, summary, grid, lls, truths)
    summary["timings"]["total_s"] = time.time() - t_start
    write_json(req.out / "posterior.json", to_plain(summary, nan_to_none=True))
    summary["out"] = str(req.out)
    return summary


def _write(
    req: InferRequest, summary: dict[str, Any], grid: ParameterGrid, lls: Mapping[str, np.ndarray], truths
) -> None:
    req.out.mkdir(parents=True, exist_ok=True)
    images = []
    if len(grid.names) == 2:
        picks = [(i, f"map {summary['maps'][i]['index']}") for i in range(min(req.corner_maps, len(summary["maps"])))]
        for i, title in picks:
            dens = {k: GridPosterior(grid, v[i]).density for k, v in lls.items()}
            fig = corner_figure(grid.axes, grid.names, dens, None if truths is None else truths[i], title)
            images.append(save_figure(fig, req.out / f"corner_map{summary['maps'][i]['index']}.png", req.dpi))
        if summary["joint"] is not None:
            dens = {k: GridPosterior(grid, v.sum(axis=0)).density for k, v in lls.items()}
            fig = corner_figure(grid.axes, grid.names, dens, summary["joint"]["truth"], "all maps jointly")
            images.append(save_figure(fig, req.out / "corner_joint.png", req.dpi))
    write_text(req.out / "index.html", posterior_page(summary, images))


def summary_text(summary: Mapping[str, Any]) -> str:
    """The console lines of an ``infer`` run."""
    agg = summary["aggregate"]
    lines = [f"lensflow.infer: {agg['maps']} posteriors of {', '.join(summary['param_names'])}; {summary['out']}"]
    if "mean_shift_sigma" in agg:
        lines.append(
            f"  emulator vs exact: mean shift {np.round(agg['mean_shift_sigma'], 3).tolist()} σ, width ratio "
            f"{np.round(agg['width_ratio_geomean'], 3).tolist()}"
        )
    for kind in ("emulator", "exact", "cl"):
        if f"{kind}_coverage68" in agg:
            lines.append(
                f"  {kind} coverage: 68 % region {agg[f'{kind}_coverage68']:.2f} ± {agg[f'{kind}_coverage68_se']:.2f}, "
                f"95 % region {agg[f'{kind}_coverage95']:.2f} ± {agg[f'{kind}_coverage95_se']:.2f}"
            )
    if "fom_ratio_field_cl_median" in agg:
        lines.append(f"  figure of merit, field-level / C_ell: median {agg['fom_ratio_field_cl_median']:.2f}")
    return "\n".join(lines)
