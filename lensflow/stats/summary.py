"""Every statistic of a set of κ maps under one configuration (noise, smoothing scales, bins)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._array import (
    ArrayLike,
    Batch,
    Bins,
    border_pixels,
    chunks,
    crop,
    edges_array,
    midpoints,
    positive,
    prepare_maps,
    to_output,
)
from .minkowski import MinkowskiBins, minkowski_from_tables, minkowski_tensor
from .noise import pixel_noise_sigma, smoothed_noise_sigma
from .pdf import moments_from_central, moments_tensor, pdf_tensor
from .peaks import extrema_counts
from .smoothing import TRUNCATE, gaussian_weights, smooth_many
from .spectra import ARCMIN, _binning, _check_nonempty, _cross_spectra, _mode_coef, auto_spectra, default_ell_edges

#: Pixels per block of maps handed to one thread by the fused CPU path (4 maps of 128x128: measured
#: 4 and 8 equal within noise, 16 a little slower).
_FUSED_BLOCK_PIXELS = 1 << 16

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
        return cls(**{str(k): _plain(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, floats), e.g. to store with results."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = _plain(v)
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


def _plain(v: Any) -> Any:
    if isinstance(v, (str, bytes)) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (Sequence, np.ndarray)) or (hasattr(v, "__iter__") and not isinstance(v, Mapping)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


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


def _scale_label(s: float) -> str:
    return f"{float(s)!r}arcmin"


def _stat_edges(cfg: SummaryConfig, name: str, i: int) -> np.ndarray:
    spec = getattr(cfg, name)
    e = np.asarray(spec[i] if isinstance(spec[0], tuple) else spec, dtype=np.float64)
    return e


_EDGE_FIELDS = {
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
        for stat, fname in _EDGE_FIELDS.items():
            if stat not in cfg.statistics:
                continue
            e = _stat_edges(cfg, fname, i) * factor
            for key in ("v0", "v1", "v2") if stat == "minkowski" else (stat,):
                out[f"{key}@{_scale_label(s)}"] = e
    return out


def _ell_edges(cfg: SummaryConfig, npix: int) -> np.ndarray:
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
        e = _ell_edges(cfg, int(npix))
        ell = _binning(int(npix), cfg.pixel_arcmin, tuple(e.tolist()))["ell_mean"]
        reps = nchannels * (nchannels + 1) // 2 if (cfg.cross and nchannels > 1) else nchannels
        out["cl"] = np.tile(ell, reps)
    for i, s in enumerate(cfg.smoothing_arcmin):
        lab = _scale_label(s)
        for stat, fname in _EDGE_FIELDS.items():
            if stat not in cfg.statistics:
                continue
            mid = np.tile(midpoints(_stat_edges(cfg, fname, i)), nchannels)
            for key in ("v0", "v1", "v2") if stat == "minkowski" else (stat,):
                out[f"{key}@{lab}"] = mid
        if "moments" in cfg.statistics:
            out[f"moments@{lab}"] = np.tile(np.arange(1.0, 5.0), nchannels)
    return out


# --------------------------------------------------------------------------------------------------
# noise


class _Noise:
    """Draws the noise of each map in map order, so results do not depend on how maps are chunked.

    An int seed on CPU gives every map its own stream (numpy's SFC64 bit generator seeded with child
    ``i`` of ``SeedSequence(seed)`` for map ``i`` of the set, normals by the ziggurat of
    :func:`lensflow.stats._fused.normal_fill`): chunking, threads and backend cannot change the noise,
    and blocks of maps can be drawn in parallel.  A numpy Generator is drawn from in map order; an int seed on an
    accelerator makes a torch generator there, so noise realizations depend on the device.
    """

    def __init__(self, cfg: SummaryConfig, generator: Any, device: torch.device, dtype: torch.dtype):
        self.sigma = pixel_noise_sigma(cfg.pixel_arcmin, cfg.sigma_e or 0.0, cfg.n_gal)
        self.device, self.dtype = device, dtype
        self.seed: int | None = None
        self.pos = 0  # maps drawn so far
        if generator is None:
            if cfg.noise_seed is None:
                raise ValueError(
                    f"generator: the config adds shape noise (sigma_e={cfg.sigma_e}) but neither a "
                    "generator nor config.noise_seed is given; pass one so the noise is reproducible"
                )
            generator = int(cfg.noise_seed)
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            if device.type == "cpu":
                self.seed = int(generator)
            else:
                generator = torch.Generator(device=device).manual_seed(int(generator))
        elif not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise ValueError(
                f"generator: expected a torch Generator, a numpy Generator or an int seed, got {generator!r}"
            )
        self.gen = generator

    @property
    def per_map(self) -> bool:
        return self.seed is not None

    def fill(self, out: np.ndarray, first: int) -> None:
        """Unit-variance noise of maps ``first, first + 1, ...`` of the set into ``out`` [n, ...]
        (per-map streams only; thread-safe, and the kernel releases the GIL)."""
        assert self.seed is not None
        kern = _kernels()
        # without numba the kernels run as plain Python (slow, same numbers), where uint64 wraps on purpose
        with np.errstate(over="ignore"):
            for k in range(out.shape[0]):
                words = np.random.SeedSequence(self.seed, spawn_key=(first + k,)).generate_state(3, np.uint64)
                view = out[k]
                dst = view if view.flags.c_contiguous else np.empty(view.shape)
                kern.normal_fill(kern.sfc64_seeded(words), dst.reshape(-1), kern.ZIG_X, kern.ZIG_RATIO)
                if dst is not view:
                    view[...] = dst

    def _torch_unit(self, shape: tuple[int, ...], nmaps: int) -> torch.Tensor:
        g = self.gen
        assert isinstance(g, torch.Generator)
        # torch's normal sampler works in blocks, so draw map by map to stay chunking-independent
        draws = [torch.randn(shape, generator=g, device=g.device, dtype=self.dtype) for _ in range(nmaps)]
        return torch.stack(draws)

    def draw_numpy(self, shape: tuple[int, ...], nmaps: int) -> np.ndarray:
        """Unit-variance noise of the next ``nmaps`` maps as a float64 array (for CPU maps)."""
        if isinstance(self.gen, torch.Generator):
            out = self._torch_unit(shape, nmaps).to("cpu", torch.float64).numpy()
        else:
            out = np.empty((nmaps, *shape))
            if self.per_map:
                self.fill(out, self.pos)
            else:
                # numpy fills arrays element by element from one stream: one call per chunk is the
                # same as one call per map
                self.gen.standard_normal(out=out)
        self.pos += nmaps
        return out

    def draw(self, shape: tuple[int, ...], nmaps: int) -> torch.Tensor:
        """Noise (σ_pix included) of the next ``nmaps`` maps on the maps' device."""
        if self.device.type == "cpu" or not isinstance(self.gen, torch.Generator):
            arr = self.draw_numpy(shape, nmaps)
            return torch.from_numpy(arr).to(self.device, self.dtype).mul_(self.sigma)
        self.pos += nmaps
        return self._torch_unit(shape, nmaps).to(self.device).mul_(self.sigma)


# --------------------------------------------------------------------------------------------------
# summarize


def _layout(batch: Batch) -> tuple[int, int]:
    """(number of maps B, channels C) of a validated batch."""
    if len(batch.lead) == 0:
        return 1, 1
    if len(batch.lead) == 1:
        return batch.lead[0], 1
    return batch.lead[0], batch.lead[1]


def summarize(
    maps: ArrayLike, config: SummaryConfig | Mapping[str, Any], generator: Any = None, backend: str = "auto"
) -> dict[str, ArrayLike]:
    """Measure every configured statistic of a set of maps; one row per map.

    Steps per map: add shape noise (if ``config.sigma_e``), measure C_ℓ, then at every smoothing scale
    smooth and measure peak and minimum counts, the pixel PDF, the Minkowski functionals and the
    moments, with edges converted to κ as :func:`kappa_edges` reports.

    Args:
        maps: [H, W] (one map), [B, H, W] or [B, C, H, W] (C channels per map, e.g. tomographic bins).
        config: a :class:`SummaryConfig` or a mapping accepted by :meth:`SummaryConfig.from_dict`.
        generator: noise source (torch Generator on the maps' device, numpy Generator, or int seed);
            defaults to ``config.noise_seed``.  Pass the same generator object across chunks of one set:
            reusing a seed per chunk repeats the noise.
        backend: ``"fused"``: one-pass numba kernels on blocks of maps in parallel threads (CPU maps,
            kernels narrower than the map); ``"torch"``: tensor operations (the reference, and the GPU
            path); ``"auto"``: fused where it applies.  Both give the same results to round-off.

    Returns:
        ``{key: [B, nfeatures]}`` with keys ``cl``, ``peaks@<σ>arcmin``, ``minima@…``, ``pdf@…``,
        ``v0@…``, ``v1@…``, ``v2@…``, ``moments@…`` (σ as ``2.0arcmin``).  Counts are raw numbers per map,
        the PDF a density, V1 per arcmin, V2 per arcmin², moments (mean, var, skew, kurt).  For C > 1
        channels the features are channel-major ([c0 bins, c1 bins, ...]) and ``cl`` with ``cross``
        holds the pairs (0,0), (0,1), …, (0,C-1), (1,1), … .  :func:`summary_bins` gives the x values.
        numpy in, numpy out; tensor in, tensor out on the same device.
    """
    cfg = SummaryConfig.from_dict(config)
    batch = prepare_maps(maps, "maps", min_size=3)
    nmaps, nchan = _layout(batch)
    npix = batch.npix
    x_all = batch.data.reshape(nmaps, nchan, npix, npix)
    dev, dt = x_all.device, x_all.dtype
    pix = cfg.pixel_arcmin
    border = border_pixels(math.ceil(cfg.border_arcmin / pix - 1e-9))
    if 2 * max(border, 0 if cfg.periodic else 1) >= npix:
        raise ValueError(f"config.border_arcmin: {cfg.border_arcmin} arcmin leaves nothing of {npix}x{npix} maps")
    noise = _Noise(cfg, generator, dev, dt) if cfg.sigma_e is not None else None
    stats = cfg.statistics

    ell_info = None
    if "cl" in stats:
        e = _ell_edges(cfg, npix)
        ell_info = _binning(npix, pix, tuple(e.tolist()))
        _check_nonempty(ell_info, npix, pix, e)
        n_ell = e.size - 1
        if nchan > 1 and cfg.cross:
            iu = torch.triu_indices(nchan, nchan, device=dev)
    bins: dict[str, Any] = {}
    for key, e in kappa_edges(cfg).items():
        if key.startswith("v1@") or key.startswith("v2@"):
            continue
        bins[key] = MinkowskiBins(e, dev, dt) if key.startswith("v0@") else Bins(e, dev, dt)
    scales = cfg.smoothing_arcmin
    labels = [_scale_label(s) for s in scales]
    sig_pix = [s / pix for s in scales]
    share_fft = cfg.periodic and any(s > 0 for s in sig_pix)

    if _use_fused(backend, dev, npix, sig_pix):
        return _summarize_fused(cfg, batch, x_all, noise, ell_info, bins, labels, sig_pix, border)

    parts: dict[str, list[torch.Tensor]] = {}

    def put(key: str, value: torch.Tensor, n: int) -> None:
        parts.setdefault(key, []).append(value.reshape(n, -1))

    for sl in chunks(nmaps, nchan * npix * npix, dev):
        x = x_all[sl]
        n = x.shape[0]
        if noise is not None:
            x = x + noise.draw((nchan, npix, npix), n)
        flat = x.reshape(n * nchan, npix, npix)
        cross = nchan > 1 and cfg.cross
        # one forward FFT serves C_ℓ and, for periodic maps, every smoothing scale
        f = torch.fft.rfft2(flat) if share_fft or ("cl" in stats and not cross) else None
        if "cl" in stats:
            assert ell_info is not None
            if cross:
                cl = _cross_spectra(x, pix, ell_info, n_ell)[:, iu[0], iu[1]]
            else:
                cl = auto_spectra(flat, pix, ell_info, n_ell, fft=f)
            put("cl", cl, n)
        smoothed = smooth_many(flat, pix, scales, cfg.periodic, fft=f if share_fft else None)
        for lab, y in zip(labels, smoothed, strict=True):
            if "peaks" in stats:
                put(f"peaks@{lab}", extrema_counts(y, bins[f"peaks@{lab}"], cfg.periodic, border, False), n)
            if "minima" in stats:
                put(f"minima@{lab}", extrema_counts(y, bins[f"minima@{lab}"], cfg.periodic, border, True), n)
            if "pdf" in stats:
                put(f"pdf@{lab}", pdf_tensor(crop(y, border), bins[f"pdf@{lab}"]), n)
            if "minkowski" in stats:
                v = minkowski_tensor(y, bins[f"v0@{lab}"], pix, cfg.periodic, border)
                v = v.reshape(n, nchan, 3, -1)
                for j, key in enumerate(("v0", "v1", "v2")):
                    put(f"{key}@{lab}", v[:, :, j], n)
            if "moments" in stats:
                put(f"moments@{lab}", moments_tensor(crop(y, border)), n)

    out = {}
    for key, vals in parts.items():
        out[key] = to_output(torch.cat(vals, dim=0), batch)
    return out


def _kernels() -> Any:
    """The fused kernels, imported on first use (numba costs a few hundred ms of start-up)."""
    from . import _fused

    return _fused


def _use_fused(backend: str, dev: torch.device, npix: int, sig_pix: Sequence[float]) -> bool:
    if backend not in ("auto", "torch", "fused"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'fused', got {backend!r}")
    why = None
    if dev.type != "cpu":
        why = f"maps on {dev.type}"
    elif not _kernels().AVAILABLE:
        why = "numba is not importable"
    elif any(int(TRUNCATE * s + 0.5) >= npix for s in sig_pix):
        why = f"a smoothing kernel as wide as the {npix}x{npix} maps"
    if backend == "fused" and why is not None:
        raise ValueError(f"backend: 'fused' needs CPU maps, numba and kernels narrower than the map; got {why}")
    return backend != "torch" and why is None


def _bin_arrays(b: Bins | None) -> tuple[np.ndarray, np.ndarray]:
    if b is None:  # statistic not requested: the kernel needs arrays of the right type only
        return np.zeros(2), np.zeros(4)
    return b.edges, _kernels().bin_spec(b.uniform, b.e0, b.inv, b.near)


def _summarize_fused(
    cfg: SummaryConfig,
    batch: Batch,
    x_all: torch.Tensor,
    noise: _Noise | None,
    ell_info: dict[str, np.ndarray] | None,
    bins: dict[str, Any],
    labels: list[str],
    sig_pix: list[float],
    border: int,
) -> dict[str, ArrayLike]:
    """:func:`summarize` on CPU through the kernels of :mod:`lensflow.stats._fused`.

    Blocks of a few maps go to a pool of ``torch.get_num_threads()`` threads; each thread draws its
    maps' noise (per-map streams) and runs the FFT and the kernels on them while they are in cache.
    """
    import scipy.fft

    _fused = _kernels()
    stats = cfg.statistics
    nmaps, nchan, npix = int(x_all.shape[0]), int(x_all.shape[1]), int(x_all.shape[-1])
    x_np = np.ascontiguousarray(x_all.numpy())
    nflat = nmaps * nchan
    periodic = bool(cfg.periodic)
    b0 = border if periodic else max(border, 1)
    flags = np.array([s in stats for s in ("peaks", "minima", "pdf", "minkowski", "moments")], dtype=np.int64)
    dummy = np.zeros((1, 1))

    cl_out = None
    if ell_info is not None:
        n_ell = ell_info["n_modes"].size
        slot = ell_info["bin"].astype(np.int64)
        coef = _mode_coef(ell_info, (cfg.pixel_arcmin * ARCMIN) ** 2 / npix**2)
        if nchan > 1 and cfg.cross:
            pa, pb = (np.ascontiguousarray(a, dtype=np.int64) for a in np.triu_indices(nchan))
        else:
            pa = pb = np.arange(nchan, dtype=np.int64)
        cl_out = np.empty((nmaps, pa.size, n_ell))

    per_scale = []
    for lab, s in zip(labels, sig_pix, strict=True):
        pk = bins.get(f"peaks@{lab}")
        mn = bins.get(f"minima@{lab}")
        pdf = bins.get(f"pdf@{lab}")
        mk = bins.get(f"v0@{lab}")
        nm2 = 2 * mk.nb + 1 if mk is not None else 0  # merged slots incl. under/overflow
        per_scale.append(
            {
                "w": gaussian_weights(s) if s > 0 else np.ones(1),
                "pk": _bin_arrays(pk),
                "mn": _bin_arrays(mn),
                "pdf": _bin_arrays(pdf),
                "mk": _bin_arrays(mk.merged if mk is not None else None),
                "out_pk": np.empty((nflat, pk.nb)) if pk is not None else dummy,
                "out_mn": np.empty((nflat, mn.nb)) if mn is not None else dummy,
                "out_pdf": np.empty((nflat, pdf.nb)) if pdf is not None else dummy,
                "out_cnt": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_grad": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_curv": np.empty((nflat, nm2 + 1)) if mk is not None else dummy,
                "out_mom": np.empty((nflat, 4)) if "moments" in stats else dummy,
            }
        )

    def rows(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return a if a is dummy else a[lo * nchan : hi * nchan]

    def task(lo: int, hi: int, pre: np.ndarray | None) -> None:
        xb = x_np[lo:hi]
        if noise is None:
            y = xb
        else:
            if pre is None:
                y = np.empty_like(xb)
                noise.fill(y, lo)
            else:
                y = pre
            _fused.add_scaled(xb, y, noise.sigma, y)
        if cl_out is not None:
            f = scipy.fft.rfft2(y, workers=1).reshape(hi - lo, nchan, -1)
            _fused.bin_spectra(f, slot, coef, pa, pb, cl_out[lo:hi])
        flat = y.reshape(-1, npix, npix)
        for p in per_scale:
            _fused.scale_stats(
                flat, p["w"], periodic, border, flags, *p["pk"], *p["mn"], *p["pdf"], *p["mk"],
                rows(p["out_pk"], lo, hi), rows(p["out_mn"], lo, hi), rows(p["out_pdf"], lo, hi),
                rows(p["out_cnt"], lo, hi), rows(p["out_grad"], lo, hi), rows(p["out_curv"], lo, hi),
                rows(p["out_mom"], lo, hi),
            )  # fmt: skip

    threads = max(1, torch.get_num_threads())
    # a block of a few maps stays in L2 across every pass; many more blocks than threads balance load
    block = max(1, min(_FUSED_BLOCK_PIXELS // (nchan * npix * npix), -(-nmaps // threads)))
    chunk = max(block * threads * 8, 1)  # maps whose sequential noise is drawn at once (memory bound)
    pool = ThreadPoolExecutor(threads) if threads > 1 and nmaps > block else None
    try:
        for c0 in range(0, nmaps, chunk):
            c1 = min(nmaps, c0 + chunk)
            pre = None
            if noise is not None and not noise.per_map:
                pre = noise.draw_numpy((nchan, npix, npix), c1 - c0)
            jobs = [(lo, min(c1, lo + block)) for lo in range(c0, c1, block)]
            args = [(lo, hi, None if pre is None else pre[lo - c0 : hi - c0]) for lo, hi in jobs]
            if pool is None:
                for a in args:
                    task(*a)
            else:
                for fut in [pool.submit(task, *a) for a in args]:
                    fut.result()
    finally:
        if pool is not None:
            pool.shutdown()

    out: dict[str, ArrayLike] = {}

    def put(key: str, value: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(value)
        out[key] = to_output(t.reshape(nmaps, -1), batch)

    if cl_out is not None:
        put("cl", cl_out)
    region = (npix - 2 * b0) ** 2
    full = (npix - 2 * border) ** 2
    for lab, p in zip(labels, per_scale, strict=True):
        if "peaks" in stats:
            put(f"peaks@{lab}", p["out_pk"])
        if "minima" in stats:
            put(f"minima@{lab}", p["out_mn"])
        if "pdf" in stats:
            width = np.diff(bins[f"pdf@{lab}"].edges)
            put(f"pdf@{lab}", p["out_pdf"] / (full * width))
        if "minkowski" in stats:
            t = [torch.from_numpy(p[k]) for k in ("out_cnt", "out_grad", "out_curv")]
            v = minkowski_from_tables(*t, bins[f"v0@{lab}"], region, cfg.pixel_arcmin)
            v = v.reshape(nmaps, nchan, 3, -1)
            for j, key in enumerate(("v0", "v1", "v2")):
                put(f"{key}@{lab}", v[:, :, j])
        if "moments" in stats:
            m = torch.from_numpy(p["out_mom"])
            put(f"moments@{lab}", moments_from_central(m[:, 0], m[:, 1], m[:, 2], m[:, 3]))
    return out


def with_reference_sigma(
    reference_maps: ArrayLike, config: SummaryConfig | Mapping[str, Any], generator: Any = None
) -> SummaryConfig:
    """Fix ν bins to absolute κ edges from a reference set (e.g. the simulations).

    Returns a copy of ``config`` whose ``sigma_ref`` holds, per smoothing scale, the standard deviation
    of all pixels of the reference maps after the config's noise, smoothing and border cut.  Summarize
    simulations and mocks with the returned config: both are then binned with the same κ edges (ν edges
    times the reference σ), whatever the mocks' own variance.
    """
    cfg = SummaryConfig.from_dict(config)
    if cfg.bin_units != "nu":
        raise ValueError("config.bin_units: with_reference_sigma needs 'nu' bins")
    probe = dataclasses.replace(cfg, statistics=("moments",), sigma_ref=None, bin_units="kappa")
    if isinstance(reference_maps, (np.ndarray, torch.Tensor)) and reference_maps.ndim == 4:
        if reference_maps.shape[1] > 1:
            raise ValueError(
                "reference_maps: one σ per scale cannot serve several channels; measure each channel "
                "with its own config, or use bin_units='kappa'"
            )
    res = summarize(reference_maps, probe, generator=generator)
    sig = []
    for s in cfg.smoothing_arcmin:
        r = res[f"moments@{_scale_label(s)}"]
        m = (r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)).reshape(-1, 4)
        # pooled variance over all maps (equal pixel counts): within-map variance + spread of the means
        var = m[:, 1].mean() + m[:, 0].var()
        if not var > 0:
            raise ValueError(f"reference_maps: zero variance at smoothing scale {s} arcmin")
        sig.append(float(np.sqrt(var)))
    return dataclasses.replace(cfg, sigma_ref=tuple(sig))


__all__ = ["STATISTICS", "SummaryConfig", "kappa_edges", "summarize", "summary_bins", "with_reference_sigma"]
