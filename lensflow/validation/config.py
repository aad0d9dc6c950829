"""The validate configuration: the ``conf/validate.yaml`` tree turned, once, into typed objects.

This is the only module that reads that tree. :func:`load_config` takes the composed config of
``python -m lensflow.validate`` (or any mapping of the same shape) and returns a
:class:`ValidationConfig`; nothing below it looks a key up or falls back to a default of its own.

One default per knob: the command's knobs are set in ``conf/validate.yaml``, and a mapping that leaves
keys out (a notebook, the in-training check) gets those keys' values from the same file, read by
:func:`yaml_defaults`. The tolerances are library knobs of :mod:`lensflow.compare` (their defaults are
dataclass fields; the YAML restates them for the command line, and a test keeps the two equal).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from lensflow._util.checks import check_bool, check_choice, check_int, check_number, check_optional_int
from lensflow._util.devices import resolve_device
from lensflow._util.plain import to_plain
from lensflow.compare import MemorizationTolerances, Tolerances
from lensflow.mapstore import SPLITS
from lensflow.report.notebook import REPORT_NOTEBOOK
from lensflow.stats.summary import STATISTICS

__all__ = [
    "BinOptions",
    "FigureOptions",
    "MeasureOptions",
    "MemorizationOptions",
    "NoiseOptions",
    "NotebookOptions",
    "Selection",
    "ValidationConfig",
    "check_split",
    "load_config",
    "yaml_defaults",
]

NOISE_MODELS = ("none", "survey")
NU_SIGMAS = ("auto", "noise", "reference")
_EDGE_KEYS = ("ell_edges", "peak_edges", "minima_edges", "pdf_edges", "minkowski_thresholds")
_MISSING = "???"  # Hydra's mandatory value


@functools.lru_cache(maxsize=1)
def _yaml_tree() -> dict[str, Any]:
    text = files("lensflow.conf").joinpath("validate.yaml").read_text(encoding="utf-8")
    tree = yaml.safe_load(text)
    return {k: v for k, v in tree.items() if k not in ("defaults", "hydra")}


def yaml_defaults() -> dict[str, Any]:
    """A fresh copy of the values ``conf/validate.yaml`` sets (the Hydra blocks left out)."""
    return _merge({}, _yaml_tree())


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively for nested mappings (both plain)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else _copy(v)
    return out


def _copy(v: Any) -> Any:
    return _merge({}, v) if isinstance(v, Mapping) else (list(v) if isinstance(v, list) else v)


def _complete(m: Mapping[str, Any] | Any) -> dict[str, Any]:
    """``m`` as plain types on top of the YAML's values; unknown keys are an error (one line)."""
    plain = to_plain(m)
    if not isinstance(plain, dict):
        raise ValueError(f"validate config: expected a mapping, got {type(m).__name__}")
    _check_known(plain, _yaml_tree(), "")
    return _merge(yaml_defaults(), plain)


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
    def from_mapping(cls, m: Mapping[str, Any] | MeasureOptions) -> MeasureOptions:
        """From a mapping shaped like conf/validate.yaml (only ``statistics``, ``smoothing_arcmin``,
        ``noise`` and ``bins`` are read); the keys left out take the YAML's values."""
        if isinstance(m, MeasureOptions):
            return m
        return cls._from_tree(_complete(m))

    @classmethod
    def _from_tree(cls, c: Mapping[str, Any]) -> MeasureOptions:
        b = dict(c["bins"])
        if b["border_arcmin"] == "auto":
            b["border_arcmin"] = None
        return cls(c["statistics"], c["smoothing_arcmin"], NoiseOptions(**c["noise"]), BinOptions(**b))

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
class ValidationConfig:
    """Everything :func:`lensflow.validation.validate` needs, typed and checked; ``plain`` is the resolved
    tree as written to ``summary.json``."""

    selection: Selection
    measure: MeasureOptions
    tolerances: Tolerances
    memorization: MemorizationOptions
    figures: FigureOptions
    notebook: NotebookOptions
    out: Path
    overwrite: bool
    batch_size: int
    seed: int
    device: torch.device
    progress: bool
    plain: dict[str, Any]


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
        MemorizationTolerances.from_mapping(m),
    )


def load_config(cfg: Mapping[str, Any] | Any) -> ValidationConfig:
    """The typed configuration of one validation from the composed config (or a mapping of its shape).

    Raises ``ValueError`` with one line naming the key on bad input (checked before any work is done).
    """
    c = _complete(cfg)
    fig, nb = c["figures"], c["notebook"]
    out = _required(c, "out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    return ValidationConfig(
        selection=_selection(c),
        measure=MeasureOptions._from_tree(c),
        tolerances=Tolerances.from_mapping(c["tolerances"]),
        memorization=_memorization(c["memorization"]),
        figures=FigureOptions(
            check_bool("figures.enabled", fig["enabled"]),
            check_int("figures.sample_maps", fig["sample_maps"], 0),
            check_int("figures.dpi", fig["dpi"]),
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
