"""The configuration of :func:`lensflow.stats.summarize` and its bins: SummaryConfig, kappa_edges, summary_bins."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lensflow._util.plain import to_plain

from ._array import edges_array, positive
from ._bins import midpoints
from .noise import pixel_noise_sigma, smoothed_noise_sigma
from .spectra import default_ell_edges, mode_binning

__all__ = ["STATISTICS", "SummaryConfig", "kappa_edges", "summary_bins"]

#: Statistic names a :class:`SummaryConfig` may select.  ``minkowski`` yields the keys v0, v1, v2.
STATISTICS = ("cl", "peaks", "minima", "pdf", "minkowski", "moments")

Edges = Sequence[float] | Sequence[Sequence[float]]


def _lin(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linspace(lo, hi, n + 1))


@dataclass(frozen=True)
class SummaryConfig:
    """How :func:`summarize` measures a set of maps.  Use one config for simulations and mocks alike.

    Attributes:
        pixel_arcmin: pixel side in arcmin.
        smoothing_arcmin: Gaussian σ (not FWHM) of each smoothing scale, arcmin; 0 means unsmoothed.
            Peaks, minima, PDF, Minkowski functionals and moments are measured at every scale; C_ℓ once,
            on the unsmoothed (noisy) map.
        periodic: periodic maps (smoothing wraps around, no border is lost); otherwise smoothing pads
            with zeros and the outer pixel ring holds no peaks and no Minkowski stencil.
        border_arcmin: width of an extra edge band left out of all per-pixel statistics (rounded up to
            whole pixels), e.g. ~2σ of the widest kernel to avoid the dip that zero padding leaves.
        ell_edges: C_ℓ bin edges; None uses ``default_ell_edges(npix, pixel_arcmin, ell_nbins)``.
        ell_nbins: number of default ℓ bins.
        cross: for [B, C, H, W] maps (e.g. tomographic bins), include the cross spectra.
        sigma_e, n_gal: shape noise per ellipticity component and galaxies per arcmin²; ``sigma_e=None``
            adds no noise.  Noise is drawn independently for every map (and channel), before smoothing.
        noise_seed: seed of the noise when :func:`summarize` gets no ``generator``.
        bin_units: ``"nu"``: the edges below are in units of a σ per smoothing scale, namely ``sigma_ref``
            if given, else the smoothed noise σ_e / sqrt(4π σ_s² n_gal); ``"kappa"``: absolute κ edges.
        sigma_ref: κ σ per smoothing scale that defines ν (see :func:`with_reference_sigma`), so that
            two sets of maps are binned with the same absolute edges.
        peak_edges, minima_edges, pdf_edges, minkowski_thresholds: bin edges (one list for every scale,
            or one list per scale in the order of ``smoothing_arcmin``).
        statistics: which of ``STATISTICS`` to compute.
    """

    pixel_arcmin: float
    smoothing_arcmin: tuple[float, ...] = (2.0,)
    periodic: bool = False
    border_arcmin: float = 0.0
    ell_edges: tuple[float, ...] | None = None
    ell_nbins: int = 20
    cross: bool = True
    sigma_e: float | None = None
    n_gal: float = 30.0
    noise_seed: int | None = None
    bin_units: str = "nu"
    sigma_ref: tuple[float, ...] | None = None
    peak_edges: Edges = field(default=_lin(-2.0, 6.0, 16))
    minima_edges: Edges = field(default=_lin(-6.0, 2.0, 16))
    pdf_edges: Edges = field(default=_lin(-4.0, 6.0, 20))
    minkowski_thresholds: Edges = field(default=_lin(-2.0, 4.0, 20))
    statistics: tuple[str, ...] = STATISTICS

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "pixel_arcmin", positive(self.pixel_arcmin, "config.pixel_arcmin"))
        scales = _float_tuple(self.smoothing_arcmin, "config.smoothing_arcmin")
        if not scales:
            raise ValueError("config.smoothing_arcmin: needs at least one scale (0 for unsmoothed)")
        for s in scales:
            positive(s, "config.smoothing_arcmin", allow_zero=True)
        if len(set(scales)) != len(scales):
            raise ValueError(f"config.smoothing_arcmin: scales must be distinct, got {list(scales)}")
        set_(self, "smoothing_arcmin", scales)
        set_(self, "periodic", bool(self.periodic))
        set_(self, "border_arcmin", positive(self.border_arcmin, "config.border_arcmin", allow_zero=True))
        if self.ell_edges is not None:
            e = edges_array(self.ell_edges, "config.ell_edges")
            if np.any(e < 0):
                raise ValueError(f"config.ell_edges: multipoles must be >= 0, got {e.tolist()}")
            set_(self, "ell_edges", tuple(e.tolist()))
        if isinstance(self.ell_nbins, bool) or not isinstance(self.ell_nbins, (int, np.integer)):
            raise ValueError(f"config.ell_nbins: expected a positive integer, got {self.ell_nbins!r}")
        if self.ell_nbins < 1:
            raise ValueError(f"config.ell_nbins: expected a positive integer, got {self.ell_nbins!r}")
        set_(self, "cross", bool(self.cross))
        if self.sigma_e is not None:
            set_(self, "sigma_e", positive(self.sigma_e, "config.sigma_e"))
        set_(self, "n_gal", positive(self.n_gal, "config.n_gal"))
        if self.noise_seed is not None and (
            isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, (int, np.integer))
        ):
            raise ValueError(f"config.noise_seed: expected an integer or None, got {self.noise_seed!r}")
        if self.bin_units not in ("nu", "kappa"):
            raise ValueError(f"config.bin_units: expected 'nu' or 'kappa', got {self.bin_units!r}")
        if self.sigma_ref is not None:
            ref = _float_tuple(self.sigma_ref, "config.sigma_ref")
            if len(ref) != len(scales):
                raise ValueError(f"config.sigma_ref: needs one σ per smoothing scale ({len(scales)}), got {len(ref)}")
            for v in ref:
                positive(v, "config.sigma_ref")
            set_(self, "sigma_ref", ref)
        for name in ("peak_edges", "minima_edges", "pdf_edges", "minkowski_thresholds"):
            set_(self, name, _edges_spec(getattr(self, name), f"config.{name}", len(scales)))
        stats = tuple(str(s) for s in _as_list(self.statistics, "config.statistics"))
        unknown = sorted(set(stats) - set(STATISTICS))
        if unknown or not stats:
            raise ValueError(f"config.statistics: expected a non-empty subset of {STATISTICS}, got {stats}")
        set_(self, "statistics", stats)

    def _binned(self) -> bool:
        return any(s in self.statistics for s in ("peaks", "minima", "pdf", "minkowski"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SummaryConfig:
        """Build from a plain mapping (e.g. a YAML/Hydra node); unknown keys are an error."""
        if isinstance(d, SummaryConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"config: expected a mapping or SummaryConfig, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(names)}")
        if "pixel_arcmin" not in d:
            raise ValueError("config.pixel_arcmin: required")
        return cls(**{str(k): to_plain(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, floats), e.g. to store with results."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = to_plain(v)
        return out

    def scale_sigma(self, i: int) -> float:
        """The κ σ that turns ν edges into κ edges at smoothing scale i (``bin_units='nu'``)."""
        if self.sigma_ref is not None:
            return self.sigma_ref[i]
        if self.sigma_e is None:
            # checked here rather than at construction, so that a config can be completed by
            # with_reference_sigma
            raise ValueError(
                "config.bin_units: 'nu' bins need a noise model (sigma_e) or sigma_ref (see "
                "with_reference_sigma); use bin_units='kappa' for absolute edges"
            )
        s = self.smoothing_arcmin[i]
        if s == 0:
            return pixel_noise_sigma(self.pixel_arcmin, self.sigma_e, self.n_gal)
        return smoothed_noise_sigma(self.sigma_e, self.n_gal, s)


def _as_list(v: Any, name: str) -> list[Any]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{name}: expected a list, got {v!r}")
    return list(v)


def _float_tuple(v: Any, name: str) -> tuple[float, ...]:
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        v = [v]
    try:
        return tuple(float(x) for x in _as_list(v, name))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of numbers, got {v!r}") from None


def _edges_spec(v: Any, name: str, nscales: int) -> tuple:
    items = _as_list(v, name)
    nested = bool(items) and all(hasattr(x, "__iter__") and not isinstance(x, (str, bytes)) for x in items)
    if nested:
        if len(items) != nscales:
            raise ValueError(f"{name}: per-scale edges need one list per smoothing scale ({nscales}), got {len(items)}")
        return tuple(tuple(edges_array(x, name).tolist()) for x in items)
    return tuple(edges_array(items, name).tolist())


def scale_label(s: float) -> str:
    """The ``<σ>arcmin`` suffix of the output keys of smoothing scale ``s`` (``2.0arcmin``)."""
    return f"{float(s)!r}arcmin"


def stat_edges(cfg: SummaryConfig, name: str, i: int) -> np.ndarray:
    """The edges of field ``name`` (e.g. ``peak_edges``) at smoothing scale ``i``, in the config's bin units."""
    spec = getattr(cfg, name)
    e = np.asarray(spec[i] if isinstance(spec[0], tuple) else spec, dtype=np.float64)
    return e


#: Output statistic -> the config field holding its edges.
EDGE_FIELDS = {
    "peaks": "peak_edges",
    "minima": "minima_edges",
    "pdf": "pdf_edges",
    "minkowski": "minkowski_thresholds",
}


def kappa_edges(config: SummaryConfig | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Absolute κ bin edges used by :func:`summarize`, keyed like its output (``peaks@2.0arcmin`` ...;
    the Minkowski thresholds under ``v0@...``, ``v1@...`` and ``v2@...``)."""
    cfg = SummaryConfig.from_dict(config)
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(cfg.smoothing_arcmin):
        factor = cfg.scale_sigma(i) if cfg.bin_units == "nu" and cfg._binned() else 1.0
        for stat, fname in EDGE_FIELDS.items():
            if stat not in cfg.statistics:
                continue
            e = stat_edges(cfg, fname, i) * factor
            for key in ("v0", "v1", "v2") if stat == "minkowski" else (stat,):
                out[f"{key}@{scale_label(s)}"] = e
    return out


def ell_edges_for(cfg: SummaryConfig, npix: int) -> np.ndarray:
    """The C_ℓ edges of ``npix x npix`` maps: ``cfg.ell_edges`` or the default log bins."""
    if cfg.ell_edges is not None:
        return np.asarray(cfg.ell_edges)
    return default_ell_edges(npix, cfg.pixel_arcmin, cfg.ell_nbins)


def summary_bins(config: SummaryConfig | Mapping[str, Any], npix: int, nchannels: int = 1) -> dict[str, np.ndarray]:
    """The x values belonging to the columns of every :func:`summarize` output, same keys.

    ``cl``: mode-weighted mean ℓ of each bin; peaks, minima, pdf, v0–v2: bin midpoints in the config's
    ``bin_units`` (ν or κ); moments: 1, 2, 3, 4 (mean, variance, skewness, excess kurtosis).  For
    multi-channel maps the values repeat once per channel (or channel pair for ``cl`` with ``cross``).
    """
    cfg = SummaryConfig.from_dict(config)
    if isinstance(nchannels, bool) or not isinstance(nchannels, (int, np.integer)) or nchannels < 1:
        raise ValueError(f"nchannels: expected a positive integer, got {nchannels!r}")
    out: dict[str, np.ndarray] = {}
    if "cl" in cfg.statistics:
        e = ell_edges_for(cfg, int(npix))
        ell = mode_binning(int(npix), cfg.pixel_arcmin, tuple(e.tolist()))["ell_mean"]
        reps = nchannels * (nchannels + 1) // 2 if (cfg.cross and nchannels > 1) else nchannels
        out["cl"] = np.tile(ell, reps)
    for i, s in enumerate(cfg.smoothing_arcmin):
        lab = scale_label(s)
        for stat, fname in EDGE_FIELDS.items():
            if stat not in cfg.statistics:
                continue
            mid = np.tile(midpoints(stat_edges(cfg, fname, i)), nchannels)
            for key in ("v0", "v1", "v2") if stat == "minkowski" else (stat,):
                out[f"{key}@{lab}"] = mid
        if "moments" in cfg.statistics:
            out[f"moments@{lab}"] = np.tile(np.arange(1.0, 5.0), nchannels)
    return out
