"""The sample check: maps drawn from the model against validation maps, measured and compared by validate.

It is ``python -m lensflow.validate`` on arrays in memory, not a second validator: the statistics (C_ℓ; peak
counts and pixel PDF after Gaussian smoothing), their bins (from the reference maps only: ν edges in
units of their smoothed σ, a border of 2 × the smoothing scale on non-periodic maps) and the metrics come
from :meth:`lensflow.validation.MeasureOptions.for_check`, :func:`lensflow.validation.measure_pair` and
:func:`lensflow.compare.compare`, so the same maps give validate's numbers. The logged metrics are
validate's fractional error of the mean per bin, ``(μ_sample - μ_ref) / |μ_ref|``, summarised by its
maximum and mean absolute value over the bins whose reference mean is measured (|μ_ref| > 3 standard
errors, the rule of :func:`lensflow.compare.summary_rows`): ``cl_frac_max``, ``cl_frac_mean``,
``peaks_frac_max``, ``peaks_frac_mean``, ``pdf_frac_max``, ``pdf_frac_mean``. What a user can judge: ``<stat>_z_max``,
the largest |error| / standard error over the bins (about 3 or less when the sets agree), and
``<stat>_frac_populated_max``, the largest |fractional error| over the well-populated bins, those whose fractional
standard error is at most half the statistic's target (:data:`lensflow.compare.tolerances.CHECK_TARGETS`; a miss
is then a ≥ 2σ detection), with their
count ``<stat>_populated_bins``: a maximum over all bins is dominated by nearly empty ones (peaks and PDF tails).
Plus ``std_ratio`` (pixel standard deviations), ``n_samples`` and ``nonfinite_samples`` (dropped before measuring).

:class:`SampleCheck` runs it during training (rank 0, every ``check.every`` epochs) and logs the metrics
and figures; :mod:`lensflow.training.run` runs it on the best checkpoint at the end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lensflow._util.atomic import write_json
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain
from lensflow.compare import compare
from lensflow.compare.clusters import group_warnings, is_grouped
from lensflow.compare.tolerances import CHECK_TARGETS, POPULATED_SE
from lensflow.mapstore import StoreMeta
from lensflow.report.check_figures import check_figures
from lensflow.stats import summary_bins
from lensflow.training.settings import CheckSettings
from lensflow.validation.config import MeasureOptions
from lensflow.validation.measure import measure_pair, seed_streams

__all__ = ["METRICS", "SampleCheck", "sample_check"]

log = get_logger(__name__)

#: The check's statistics (names of :func:`lensflow.stats.summarize`).
STATISTICS = ("cl", "peaks", "pdf")
#: Maps per set below which there are no metrics (NaN): :func:`lensflow.compare.compare` needs 4.
MIN_MAPS = 4
METRICS = (
    "cl_frac_max",
    "cl_frac_mean",
    "peaks_frac_max",
    "peaks_frac_mean",
    "pdf_frac_max",
    "pdf_frac_mean",
    *(f"{s}_{m}" for s in STATISTICS for m in ("z_max", "frac_populated_max", "populated_bins")),
)


@torch.no_grad()
def draw_samples(
    module: Any, n: int, cond: Any, check: CheckSettings, seed: int, device: torch.device | str | None
) -> np.ndarray:
    """``n`` maps from the module's EMA weights at ``check.temperature``, latents from one seeded CPU stream."""
    dev = torch.device(device) if device is not None else module.device
    noise = torch.randn(n, module.num_dims, generator=torch.Generator(device="cpu").manual_seed(int(seed)))
    x = module.sample(n, cond=cond, temperature=check.temperature, noise=noise.to(dev), batch_size=check.batch_size)
    return x.detach().cpu().numpy()


def sample_check(
    module: Any,
    ref_maps: np.ndarray,
    ref_params: np.ndarray | None = None,
    *,
    check: CheckSettings | Mapping[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    tag: str = "check",
    device: torch.device | str | None = None,
    keep_samples: bool = False,
    ref_groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Sample as many maps as ``ref_maps`` (with ``ref_params`` as conditions) and compare them.

    ``ref_groups`` are the reference maps' realization ids (:meth:`KappaDataModule.eval_groups`): maps cut from one
    N-body box are correlated, and their standard errors are then clustered, as in ``validate``.

    Returns ``{"metrics": {...}, "figures": {name: path}, "bins": {...}, "samples": array or None}``
    (``bins``: per statistic the bin centres and both means; the samples only with ``keep_samples``).
    With ``out_dir``, ``<tag>.json`` and the figures ``<tag>_maps.png``, ``<tag>_stats.png`` go there.
    """
    chk = CheckSettings.from_config(check)
    meta: StoreMeta = module.meta
    ref = np.asarray(ref_maps)
    n = ref.shape[0]
    samples = draw_samples(module, n, ref_params if module.param_names else None, chk, seed, device)
    good = np.isfinite(samples).reshape(n, -1).all(axis=1)
    s = samples[good]
    metrics: dict[str, float] = {"n_samples": float(n), "nonfinite_samples": float(n - good.sum())}
    bins: dict[str, Any] = {}
    figures: dict[str, str] = {}
    if min(s.shape[0], n) < MIN_MAPS:
        log.warning("sample check %s: %d finite samples of %d maps, too few to compare (%d)", tag, len(s), n, MIN_MAPS)
        metrics.update(dict.fromkeys(METRICS, math.nan))
    else:
        groups = (ref_groups, None)
        result, bins = compare_maps(ref, s, MeasureOptions.for_check(chk, meta, STATISTICS), meta, seed, groups)
        metrics.update(metrics_of(result, grouped=is_grouped(ref_groups)))
        ref_std = float(ref.std(dtype=np.float64))
        metrics["std_ratio"] = float(s.std(dtype=np.float64)) / ref_std if ref_std > 0 else math.nan
    if out_dir is not None:
        out = Path(out_dir)
        if bins:
            figures = check_figures(ref, s, bins, meta, out, tag)
        write_json(out / f"{tag}.json", to_plain({"metrics": metrics, "bins": bins}, nan_to_none=True))
    return {"metrics": metrics, "figures": figures, "bins": bins, "samples": samples if keep_samples else None}


def compare_maps(
    ref: np.ndarray,
    cand: np.ndarray,
    options: MeasureOptions,
    meta: StoreMeta,
    seed: int = 0,
    groups: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate's comparison of two sets of maps in memory: the :func:`lensflow.compare.compare` result and,
    per statistic, ``{"x": bin centres, "reference": mean, "sample": mean, "frac": fractional error}``.
    ``groups``: each set's realization ids, or ``None`` for independent maps (:func:`lensflow.compare.compare`).

    Measured by validate's :func:`lensflow.validation.measure.measure_pair` with its seed streams; the maps as they
    are (float32 or float64).
    """
    config, stats = measure_pair(ref, cand, options, meta, seed_streams(seed), dtype=None)
    result = compare(stats["reference"], stats["candidate"], seed=seed, groups=groups)
    xs = summary_bins(config, ref.shape[-1], ref.shape[1])
    bins = {
        _short(name): {
            "name": name,
            "x": xs[name],
            "reference": r["mean_reference"],
            "sample": r["mean_candidate"],
            "frac": r["frac_error_mean"],
        }
        for name, r in result["statistics"].items()
    }
    return result, bins


def full_verdict(
    ref: np.ndarray, samples: np.ndarray, meta: StoreMeta, seed: int, ref_groups: np.ndarray | None = None
) -> dict[str, Any]:
    """``python -m lensflow.validate``'s default comparison (every statistic, both smoothing scales, calibrated
    verdict and omnibus test) of finite ``samples`` against ``ref``: pass, failures, sizes and warnings.
    ``ref_groups``: the reference maps' realization ids; maps that share a box get clustered errors, as in
    ``validate``, and too few boxes give the warning of :func:`~lensflow.compare.clusters.group_warnings`."""
    s = samples[np.isfinite(samples).reshape(samples.shape[0], -1).all(axis=1)]
    if min(len(s), len(ref)) < MIN_MAPS:
        return {"pass": None, "failures": [f"too few maps to compare ({len(s)} samples, {len(ref)} references)"]}
    result, _ = compare_maps(ref, s, MeasureOptions.from_config({}), meta, seed, (ref_groups, None))
    n = min(len(ref), len(s))
    warnings = group_warnings((ref_groups, None))
    return {
        "warnings": warnings,
        "pass": bool(result["pass"]),
        "failures": list(result["failures"]),
        "n_reference": int(result["n_reference"]),
        "n_candidate": int(result["n_candidate"]),
        "omnibus_pvalue": float(result["omnibus"]["pvalue"]),
        "noise_limited": n < 1000,
    }


def _short(name: str) -> str:
    """``peaks@4.0arcmin`` -> ``peaks``: the check has one smoothing scale."""
    return name.split("@")[0]


def measured_bins(stat: Mapping[str, Any]) -> np.ndarray:
    """Bins whose reference mean is measured, |μ_ref| > 3 σ_ref / sqrt(N_ref) (:func:`compare.summary_rows`)."""
    mr, sr = np.asarray(stat["mean_reference"], float), np.asarray(stat["std_reference"], float)
    return np.abs(mr) > 3 * sr / math.sqrt(stat["n_reference"])


def metrics_of(result: Mapping[str, Any], grouped: bool = False) -> dict[str, float]:
    """The check's metrics from a :func:`lensflow.compare.compare` result (see the module docstring); with
    ``grouped`` reference maps (maps that share a box) the z of each bin is the clustered one the verdict uses."""
    out: dict[str, float] = {}
    for name, stat in result["statistics"].items():
        frac = np.abs(np.asarray(stat["frac_error_mean"], float))
        use = measured_bins(stat) & np.isfinite(frac)
        key = _short(name)
        out[f"{key}_frac_max"] = float(frac[use].max()) if use.any() else math.nan
        out[f"{key}_frac_mean"] = float(frac[use].mean()) if use.any() else math.nan
        se, mr = np.asarray(stat["se_mean"], float), np.abs(np.asarray(stat["mean_reference"], float))
        z = np.abs(np.asarray(stat["z_mean_pooled" if grouped and "z_mean_pooled" in stat else "z_mean"], float))
        live = (se > 0) & np.isfinite(z)
        out[f"{key}_z_max"] = float(z[live].max()) if live.any() else math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            full = use & (se <= POPULATED_SE * CHECK_TARGETS.get(key, 0.05) * mr)
        out[f"{key}_frac_populated_max"] = float(frac[full].max()) if full.any() else math.nan
        out[f"{key}_populated_bins"] = float(full.sum())
    return out


class SampleCheck(L.Callback):
    """The sample check during training: every ``check.every`` epochs, on rank 0, against the first
    ``check.n_samples`` validation maps; metrics logged as ``check/<name>``, figures and JSON written to
    ``<run_dir>/checks/`` and handed to loggers that take images."""

    def __init__(self, check: CheckSettings, seed: int) -> None:
        self.check = check
        self.seed = int(seed)
        self._ref: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.check.every
        if trainer.sanity_checking or every <= 0 or (trainer.current_epoch + 1) % every:
            return
        dm = getattr(trainer, "datamodule", None)
        if not trainer.is_global_zero or dm is None or not hasattr(dm, "eval_maps"):
            return
        if self._ref is None:
            groups = dm.eval_groups("val", self.check.n_samples) if hasattr(dm, "eval_groups") else None
            self._ref = (*dm.eval_maps("val", self.check.n_samples), groups)
        tag = f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}"
        maps, params, groups = self._ref
        res = sample_check(
            pl_module.model,
            maps,
            params,
            ref_groups=groups,
            check=self.check,
            seed=self.seed + trainer.current_epoch,
            out_dir=Path(trainer.default_root_dir) / "checks",
            tag=tag,
        )
        for k, v in res["metrics"].items():
            pl_module.log(f"check/{k}", float(v), rank_zero_only=True)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                for name, path in res["figures"].items():
                    try:
                        logger.log_image(key=f"check/{name}", images=[str(path)], step=trainer.global_step)
                    except Exception as e:  # noqa: BLE001 - a logger hiccup must not kill a long run
                        log.warning("could not log image %s to %s: %s", path, type(logger).__name__, e)
