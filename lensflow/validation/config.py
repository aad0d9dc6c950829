"""What ``python -m lensflow.validate`` is asked to do: the config tree turned, once, into typed objects.

This is the only module that reads that tree. :meth:`ValidationRequest.from_config` takes the composed config of
``python -m lensflow.validate`` (or any mapping of the same shape) and returns a :class:`ValidationRequest`;
nothing below it looks a key up or falls back to a default of its own.

One default per knob, in Python: a mapping that leaves keys out (a notebook, a Python caller) gets them from
:data:`DEFAULTS`, whose tolerances are the :mod:`lensflow.compare` dataclasses' own defaults, and the command line
composes the same table (``conf/validate.yaml`` takes it as a node, :mod:`lensflow.confstore`). The in-training
check measures with :meth:`MeasureOptions.for_check`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensflow._util.checks import check_bool, check_choice, check_int, check_number, check_optional_int
from lensflow._util.devices import resolve_device
from lensflow._util.plain import merge, to_plain
from lensflow.compare import MemorizationTolerances, Tolerances
from lensflow.mapstore import SPLITS, StoreMeta
from lensflow.report.notebook import REPORT_NOTEBOOK
from lensflow.stats.summary import STATISTICS

__all__ = [
    "DEFAULTS",
    "BinOptions",
    "FigureOptions",
    "MeasureOptions",
    "MemorizationOptions",
    "NoiseOptions",
    "NotebookOptions",
    "Selection",
    "ValidationRequest",
    "check_split",
]

NOISE_MODELS = ("none", "survey")
NU_SIGMAS = ("auto", "noise", "reference")
_EDGE_KEYS = ("ell_edges", "peak_edges", "minima_edges", "pdf_edges", "minkowski_thresholds")
_MISSING = "???"  # Hydra's mandatory value


_TOLERANCES = to_plain(dataclasses.asdict(Tolerances()))
_MEMORIZATION_TOLERANCES = to_plain(dataclasses.asdict(MemorizationTolerances()))

#: Every key of a validate config and its default (the ``lensflow/validate`` node of ``conf/validate.yaml``).
#: ``reference``, ``candidate`` and ``out`` are required.
DEFAULTS: dict[str, Any] = {
    "reference": _MISSING,  # map store of the reference maps (simulations)
    "reference_split": "test",  # train | val | test | all: use maps the emulator never saw
    "candidate": _MISSING,  # map store of the candidate maps (e.g. lensflow.generate's mocks)
    "candidate_split": "all",  # train | val | test | all
    "out": _MISSING,  # output folder (created)
    "overwrite": False,  # replace the outputs of an earlier run in `out`
    # Per-map parameters to select, applied to both stores (maps whose params equal these values, relative
    # tolerance 1e-6), e.g. select.Omega_m=0.3 select.sigma_8=0.8. Empty: all maps.
    "select": {},
    "max_maps": 1000,  # maps per set (a seeded random subset); null = all
    "batch_size": 128,  # maps per statistics batch
    "seed": 0,  # seeds the subsets and the (independent) shape-noise streams of both sets
    "device": "auto",  # auto (cuda if available) | cpu | cuda | cuda:N
    "progress": True,  # tqdm progress bars on stderr
    "statistics": ["cl", "peaks", "minima", "pdf", "minkowski", "moments"],  # any of these (minkowski gives v0, v1, v2)
    "smoothing_arcmin": [2.0, 4.0],  # Gaussian sigma (not FWHM) of each smoothing scale, arcmin; 0 = none
    "noise": {
        "model": "none",  # none | survey (independent white shape noise per map, before smoothing)
        "sigma_e": 0.26,  # ellipticity dispersion per component (survey)
        "n_gal": 30.0,  # galaxies per arcmin^2 (survey)
    },
    "bins": {
        "units": "nu",  # nu (edges in units of a sigma per scale) | kappa (absolute edges)
        # sigma behind nu: noise = smoothed shape-noise sigma (needs noise.model=survey); reference = pixel
        # std of the reference maps after noise and smoothing; auto = noise if there is noise, else reference.
        "nu_sigma": "auto",
        "reference_sigma_maps": 256,  # reference maps used to measure that sigma
        "ell_nbins": 20,  # log-spaced C_ell bins from 2 ell_min to ell_Nyquist
        "ell_edges": None,  # explicit C_ell bin edges instead
        "cross": True,  # cross spectra between channels (tomography)
        "border_arcmin": "auto",  # edge band left out of per-pixel statistics; auto = 2 x widest scale (0 if periodic)
        "peak_edges": None,  # null = lensflow.stats defaults (nu: -2..6 in 16 bins)
        "minima_edges": None,  # (nu: -6..2 in 16 bins)
        "pdf_edges": None,  # (nu: -4..6 in 20 bins)
        "minkowski_thresholds": None,  # (nu: -2..4 in 20 bins)
    },
    "tolerances": _TOLERANCES,  # the verdict's thresholds: the fields of lensflow.compare.Tolerances
    # Field-level check: with the emulator's checkpoint and a reference store written by a built-in flat
    # simulator, the emulator's KL gap on the reference maps (exact log p minus emulator log p, bits per pixel,
    # with its SE).
    "emulator": None,
    "field": {
        "max_maps": 1000,  # reference maps scored
        "kl_tolerance": None,  # bits/pixel; set (e.g. 0.001) to fail above it
        # the trained emulator the reference maps were drawn from (generate's mocks of a teacher): its log p
        # is their exact likelihood, for maps no built-in simulator made (N-body)
        "teacher": None,
    },
    "memorization": {
        "enabled": "auto",  # auto (run when training maps are known) | true | false
        "training": None,  # training store; null = the reference store
        "training_split": "train",
        "max_maps": 500,  # candidate and held-out maps checked (training maps: all of them)
        "batch_size": 256,  # training maps per streamed batch / cdist chunk
        "dihedral": False,  # also match rotated/flipped copies (8x the cost)
        **_MEMORIZATION_TOLERANCES,  # the fields of lensflow.compare.MemorizationTolerances
    },
    "figures": {
        "enabled": True,  # false: no PNGs (summary.json, stats.h5 and report.html still written)
        "sample_maps": 4,  # maps of each set in sample_maps.png (channel 0, one colour scale)
        "dpi": 110,
    },
    "notebook": {
        "execute": False,  # run the report notebook with papermill, export it to HTML
        "path": None,  # null = the report notebook shipped with lensflow (lensflow/report/validation_report.ipynb)
        "timeout": 600,  # seconds per cell
    },
}


def _complete(m: Mapping[str, Any] | Any) -> dict[str, Any]:
    """``m`` as plain types on top of :data:`DEFAULTS`; unknown keys are an error (one line)."""
    plain = to_plain(m)
    if not isinstance(plain, dict):
        raise ValueError(f"validate config: expected a mapping, got {type(m).__name__}")
    _check_known(plain, DEFAULTS, "")
    return merge(DEFAULTS, plain)


def _check_known(m: Mapping[str, Any], base: Mapping[str, Any], prefix: str) -> None:
    unknown = sorted(f"{prefix}{k}" for k in m if k not in base)
    if unknown:
        raise ValueError(f"validate config: unknown key(s) {unknown}; see conf/validate.yaml")
    for k, v in m.items():
        # select is open; tolerances and memorization name their unknown keys themselves
        if isinstance(v, Mapping) and isinstance(base[k], dict) and k not in ("select", "tolerances", "memorization"):
            _check_known(v, base[k], f"{prefix}{k}.")


def check_split(split: Any, what: str) -> str:
    """A split name (``train``/``val``/``test``/``all``; ``None`` means ``all``)."""
    s = "all" if split is None else str(split)
    return check_choice(what, s, (*SPLITS, "all"))


def _scales(v: Any) -> tuple[float, ...]:
    scales = [v] if isinstance(v, (int, float)) else list(v)
    if not scales:
        raise ValueError("smoothing_arcmin: needs at least one scale (0 for unsmoothed maps)")
    return tuple(check_number("smoothing_arcmin", s, minimum=0) for s in scales)


def _statistics(v: Any) -> tuple[str, ...]:
    stats = [v] if isinstance(v, str) else list(v)
    unknown = sorted(set(stats) - set(STATISTICS))
    if unknown or not stats:
        raise ValueError(f"statistics: expected a non-empty subset of {list(STATISTICS)}, got {stats}")
    return tuple(str(s) for s in stats)


# ---------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseOptions:
    """Shape noise: ``model`` none | survey, σ_e per component, n_gal per arcmin² (survey)."""

    model: str
    sigma_e: float
    n_gal: float

    def __post_init__(self) -> None:
        check_choice("noise.model", self.model, NOISE_MODELS)
        check_number("noise.sigma_e", self.sigma_e, minimum=0, strict_min=True)
        check_number("noise.n_gal", self.n_gal, minimum=0, strict_min=True)


@dataclass(frozen=True)
class BinOptions:
    """Bins of the statistics (keys of ``bins:`` in conf/validate.yaml).

    ``border_arcmin=None`` is ``auto`` (2 × the widest smoothing scale, 0 for periodic maps); ``None``
    edges are the :class:`lensflow.stats.SummaryConfig` defaults.
    """

    units: str
    nu_sigma: str
    reference_sigma_maps: int
    ell_nbins: int
    cross: bool
    border_arcmin: float | None
    ell_edges: Any = None
    peak_edges: Any = None
    minima_edges: Any = None
    pdf_edges: Any = None
    minkowski_thresholds: Any = None

    def __post_init__(self) -> None:
        check_choice("bins.units", self.units, ("nu", "kappa"))
        check_choice("bins.nu_sigma", self.nu_sigma, NU_SIGMAS)
        check_int("bins.reference_sigma_maps", self.reference_sigma_maps, 1)
        check_int("bins.ell_nbins", self.ell_nbins, 1)
        check_bool("bins.cross", self.cross)
        check_number("bins.border_arcmin", self.border_arcmin, minimum=0, allow_none=True)

    def edges(self) -> dict[str, Any]:
        """The explicit bin edges (those not left to the :class:`SummaryConfig` defaults)."""
        return {k: getattr(self, k) for k in _EDGE_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class MeasureOptions:
    """What is measured on both sets: the statistics, smoothing scales, noise model and bins."""

    statistics: tuple[str, ...]
    smoothing_arcmin: tuple[float, ...]
    noise: NoiseOptions
    bins: BinOptions

    def __post_init__(self) -> None:
        object.__setattr__(self, "statistics", _statistics(self.statistics))
        object.__setattr__(self, "smoothing_arcmin", _scales(self.smoothing_arcmin))
        if self.bins.units == "nu" and self.bins.nu_sigma == "noise" and self.noise.model != "survey" and self.binned:
            raise ValueError("bins.nu_sigma: 'noise' needs noise.model=survey (there is no noise sigma otherwise)")

    @classmethod
    def from_config(cls, m: Mapping[str, Any] | MeasureOptions) -> MeasureOptions:
        """From a mapping shaped like a validate config (only ``statistics``, ``smoothing_arcmin``, ``noise`` and
        ``bins`` are read); the keys left out take :data:`DEFAULTS`."""
        if isinstance(m, MeasureOptions):
            return m
        return _measure_options(_complete(m))

    @classmethod
    def for_check(cls, check: Any, meta: StoreMeta, statistics: tuple[str, ...]) -> MeasureOptions:
        """What training's sample check measures: ``statistics`` at one smoothing scale (``check.smoothing_arcmin``,
        default 2 pixels), no shape noise, ``check.n_bins`` peak and PDF bins over validate's default ν ranges
        (-2..6 and -4..6); everything else is validate's default."""
        base = cls.from_config({})
        sigma = 2.0 * meta.pixel_arcmin if check.smoothing_arcmin is None else float(check.smoothing_arcmin)
        n = int(check.n_bins)
        bins = dataclasses.replace(
            base.bins,
            peak_edges=np.linspace(-2.0, 6.0, n + 1).tolist(),
            pdf_edges=np.linspace(-4.0, 6.0, n + 1).tolist(),
        )
        return cls(tuple(statistics), (sigma,), base.noise, bins)

    @property
    def binned(self) -> bool:
        """Whether any statistic is a histogram over κ thresholds (peaks, minima, PDF, Minkowski)."""
        return any(k in self.statistics for k in ("peaks", "minima", "pdf", "minkowski"))

    @property
    def nu_sigma(self) -> str:
        """The σ behind ν edges, ``auto`` resolved: ``noise`` with survey noise, else ``reference``."""
        if self.bins.nu_sigma != "auto":
            return self.bins.nu_sigma
        return "noise" if self.noise.model == "survey" else "reference"

    @property
    def needs_reference_sigma(self) -> bool:
        """Whether ν edges are set by the reference maps' own σ (measured on ``reference_sigma_maps``)."""
        return self.bins.units == "nu" and self.nu_sigma == "reference" and self.binned


# ---------------------------------------------------------------------------------------------------
# Which maps, what else, where to
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which maps are compared: a split of each store, optional parameter values, at most ``max_maps``."""

    reference: Path
    reference_split: str
    candidate: Path
    candidate_split: str
    select: dict[str, float] = field(default_factory=dict)
    max_maps: int | None = None


@dataclass(frozen=True)
class MemorizationOptions:
    """The memorisation check: ``enabled`` true | false | ``"auto"``, training store and split, limits."""

    enabled: bool | str
    training: Path | None
    training_split: str
    max_maps: int | None
    batch_size: int
    dihedral: bool
    tolerances: MemorizationTolerances


@dataclass(frozen=True)
class FigureOptions:
    enabled: bool
    sample_maps: int
    dpi: int


@dataclass(frozen=True)
class NotebookOptions:
    execute: bool
    path: Path
    timeout: int


@dataclass(frozen=True)
class FieldOptions:
    """The field-level check: the emulator's KL gap on the reference maps against their exact likelihood."""

    emulator: Path | None
    max_maps: int
    kl_tolerance: float | None
    teacher: Path | None = None  # a trained emulator whose draws the reference maps are: its log p is the exact one


@dataclass(frozen=True)
class ValidationRequest:
    """Everything :func:`lensflow.validation.validate` needs, typed and checked; ``plain`` is the resolved
    tree as written to ``summary.json``."""

    selection: Selection
    measure: MeasureOptions
    tolerances: Tolerances
    memorization: MemorizationOptions
    figures: FigureOptions
    notebook: NotebookOptions
    field: FieldOptions
    out: Path
    overwrite: bool
    batch_size: int
    seed: int
    device: torch.device
    progress: bool
    plain: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> ValidationRequest:
        """The request of one validation from the composed config (or a mapping of its shape; keys left out take
        :data:`DEFAULTS`). Raises ``ValueError`` with one line naming the key on bad input, before any work."""
        return _request(cfg)


def _required(c: Mapping[str, Any], key: str) -> Path:
    if c[key] in (None, "", _MISSING):
        raise ValueError(f"{key}: required (e.g. {key}=PATH)")
    return Path(str(c[key]))


def _selection(c: Mapping[str, Any]) -> Selection:
    select = c["select"] or {}
    values = {str(k): check_number(f"select.{k}", v) for k, v in select.items()}
    return Selection(
        _required(c, "reference"),
        check_split(c["reference_split"], "reference_split"),
        _required(c, "candidate"),
        check_split(c["candidate_split"], "candidate_split"),
        values,
        check_optional_int("max_maps", c["max_maps"]),
    )


def _memorization(m: Mapping[str, Any]) -> MemorizationOptions:
    m = dict(m)
    enabled = m.pop("enabled")
    if enabled not in (True, False, "auto"):
        raise ValueError(f"memorization.enabled: expected true, false or auto, got {enabled!r}")
    training = m.pop("training")
    return MemorizationOptions(
        enabled,
        None if training in (None, "") else Path(str(training)),
        check_split(m.pop("training_split"), "memorization.training_split"),
        check_optional_int("memorization.max_maps", m.pop("max_maps")),
        check_int("memorization.batch_size", m.pop("batch_size")),
        check_bool("memorization.dihedral", m.pop("dihedral")),
        MemorizationTolerances.from_config(m),
    )


def _measure_options(c: Mapping[str, Any]) -> MeasureOptions:
    """The measure part of a complete config tree."""
    b = dict(c["bins"])
    if b["border_arcmin"] == "auto":
        b["border_arcmin"] = None
    return MeasureOptions(c["statistics"], c["smoothing_arcmin"], NoiseOptions(**c["noise"]), BinOptions(**b))


def _request(cfg: Mapping[str, Any] | Any) -> ValidationRequest:
    c = _complete(cfg)
    fig, nb, fld = c["figures"], c["notebook"], c["field"]
    out = _required(c, "out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    return ValidationRequest(
        selection=_selection(c),
        measure=_measure_options(c),
        tolerances=Tolerances.from_config(c["tolerances"]),
        memorization=_memorization(c["memorization"]),
        figures=FigureOptions(
            check_bool("figures.enabled", fig["enabled"]),
            check_int("figures.sample_maps", fig["sample_maps"], 0),
            check_int("figures.dpi", fig["dpi"]),
        ),
        field=FieldOptions(
            None if c["emulator"] in (None, "") else Path(str(c["emulator"])),
            check_int("field.max_maps", fld["max_maps"], 2),
            check_number("field.kl_tolerance", fld["kl_tolerance"], minimum=0, allow_none=True),
            None if fld["teacher"] in (None, "") else Path(str(fld["teacher"])),
        ),
        notebook=NotebookOptions(
            check_bool("notebook.execute", nb["execute"]),
            REPORT_NOTEBOOK if nb["path"] in (None, "") else Path(str(nb["path"])),
            check_int("notebook.timeout", nb["timeout"]),
        ),
        out=out,
        overwrite=check_bool("overwrite", c["overwrite"]),
        batch_size=check_int("batch_size", c["batch_size"]),
        seed=check_int("seed", c["seed"], 0),
        device=resolve_device(c["device"]),
        progress=check_bool("progress", c["progress"]),
        plain=c,
    )
