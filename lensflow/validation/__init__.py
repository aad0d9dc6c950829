"""Validation of candidate κ maps (emulator mocks) against reference maps (simulations).

The one definition of the check
-------------------------------
Everything that compares two sets of maps -- ``python -m lensflow.validate`` and the in-training check
alike -- goes through :func:`measure_pair` (the seed split of :func:`seed_streams`, then steps 1 and 2 below on
both sets) and step 3, so both give the same numbers for the same maps:

1. :func:`summary_config_for` ``(options, meta, reference_maps)`` → the one
   :class:`lensflow.stats.SummaryConfig` for both sets: the statistics, smoothing scales and noise
   model of ``options`` (:class:`MeasureOptions` or a mapping shaped like a validate config), bins
   from the reference only (ν edges in units of the smoothed noise σ, or of the reference maps' own σ),
   a border of 2 × the widest smoothing scale on non-periodic maps;
2. :func:`statistics_of` ``(maps, config, seed=...)`` → per-map statistics ``{name: [N, F]}`` (float32
   maps, one seeded shape-noise stream per set, carried across batches);
3. :func:`lensflow.compare.compare` ``(reference_stats, candidate_stats, tolerances)`` → metrics and
   verdicts per statistic and bin.

:func:`build_summary_config` and :func:`compute_statistics` are the first two reading maps from a map
store. The package's modules: ``config`` (the config tree → typed objects, read nowhere else),
``measure`` (selection, the SummaryConfig, statistics), ``memorization`` (the memorisation check on
stores), ``statsfile`` (the files of a validation folder) and ``run`` (:func:`validate`, the command).
"""

from __future__ import annotations

from lensflow.compare import compare
from lensflow.validation.config import MeasureOptions, ValidationRequest
from lensflow.validation.measure import (
    build_summary_config,
    check_compatible,
    compute_statistics,
    measure_pair,
    seed_streams,
    select_indices,
    statistics_of,
    summary_config_for,
)
from lensflow.validation.run import validate
from lensflow.validation.statsfile import load_report, read_stats

__all__ = [
    "MeasureOptions",
    "ValidationRequest",
    "build_summary_config",
    "check_compatible",
    "compare",
    "compute_statistics",
    "load_report",
    "measure_pair",
    "read_stats",
    "seed_streams",
    "select_indices",
    "statistics_of",
    "summary_config_for",
    "validate",
]
