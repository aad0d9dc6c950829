"""``validate(cfg)``: one validation from its config to its output folder (orchestration only).

1. Select maps: the ``reference_split`` of the reference store (held-out simulations by default) and
   the ``candidate_split`` of the candidate store, optionally only maps with given parameters
   (``select``), at most ``max_maps`` of each (a seeded random subset).
2. Measure every statistic under ONE SummaryConfig, each set with its own seeded shape-noise stream
   (:mod:`lensflow.validation.measure`), and compare bin by bin (:func:`lensflow.compare.compare`).
3. Memorisation: distances of candidate maps to the training maps against those of held-out maps.
4. Write ``summary.json`` and ``stats.h5`` (:mod:`lensflow.validation.statsfile`), PNG figures and a
   self-contained ``report.html`` (:mod:`lensflow.report`), with ``notebook.execute=true`` also the
   executed report notebook and its HTML; log the verdict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.atomic import write_text
from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow._util.progress import progress
from lensflow.compare import compare
from lensflow.compare.clusters import group_warnings
from lensflow.mapstore import MapStore, open_store
from lensflow.report.figures import draw_validation_figures
from lensflow.report.html import render_html
from lensflow.report.notebook import check_notebook, execute_notebook
from lensflow.report.text import verdict_lines
from lensflow.stats.summary import kappa_edges, summary_bins
from lensflow.validation import measure
from lensflow.validation.config import ValidationRequest
from lensflow.validation.field import field_check
from lensflow.validation.memorization import run_memorization
from lensflow.validation.statsfile import (
    REPORT_FILE,
    SUMMARY_FILE,
    Measured,
    summary_record,
    write_measured,
    write_summary,
)

__all__ = ["validate", "verdict_text"]

log = get_logger(__name__)


def _select(vc: ValidationRequest, ref: MapStore, cand: MapStore, seeds: list[int], warnings: list[str]) -> dict:
    """The maps of each set (seeded subsets), with warnings about shared or pooled maps."""
    sel = vc.selection
    sets = {"reference": (ref, sel.reference_split), "candidate": (cand, sel.candidate_split)}
    idx = {
        what: measure.select_indices(st, split, sel.select, sel.max_maps, np.random.default_rng(s), what)
        for (what, (st, split)), s in zip(sets.items(), seeds, strict=True)
    }
    if sel.reference.resolve() == sel.candidate.resolve() and np.intersect1d(*idx.values()).size:
        warnings.append(
            f"reference and candidate share {np.intersect1d(*idx.values()).size} maps (same store, overlapping "
            "splits): the verdict compares maps with themselves"
        )
    for what, (st, split) in sets.items():
        n_sets = 1 if sel.select else measure.parameter_sets(st, split)
        if n_sets > 1:
            warnings.append(
                f"{what} maps come from {n_sets} parameter sets and are pooled; use select.* to compare one"
            )
    return idx


def _measure(vc: ValidationRequest, ref: MapStore, cand: MapStore, warnings: list[str]) -> Measured:
    """Select, measure both sets under one SummaryConfig, compare, and run the memorisation check."""
    measure.check_compatible(ref, cand, warnings)
    seeds = measure.seed_streams(vc.seed)
    idx = _select(vc, ref, cand, [seeds.subset_reference, seeds.subset_candidate], warnings)
    warnings += low_power_warnings(ref, vc.selection.reference_split, idx["reference"].size, idx["candidate"].size)
    t0 = time.time()
    bar = progress(sum(i.size for i in idx.values()), unit="map", desc="statistics", enabled=vc.progress)
    sc, stats = measure.measure_pair(
        (ref, idx["reference"]),
        (cand, idx["candidate"]),
        vc.measure,
        ref.meta,
        seeds,
        device=vc.device,
        batch_size=vc.batch_size,
        progress=bar,
    )
    bar.close()
    seconds = time.time() - t0
    # maps that share a realization id (cut from one N-body box or one full sky) are correlated: clustered errors
    groups = (ref.read_realization()[idx["reference"]], cand.read_realization()[idx["candidate"]])
    warnings += group_warnings(groups)
    result = compare(stats["reference"], stats["candidate"], vc.tolerances, seed=seeds.permutation, groups=groups)
    field = field_check(vc.field, ref, idx["reference"], vc.device)
    split = vc.selection.reference_split
    mem, training = run_memorization(
        vc.memorization,
        ref,
        split,
        idx["reference"],
        cand,
        idx["candidate"],
        device=vc.device,
        show_progress=vc.progress,
        warnings=warnings,
    )
    if mem.get("status") == "skipped" and vc.memorization.enabled is not False:
        warnings.append(f"memorization check {mem.get('note', 'skipped')}")
    inputs = {
        "reference": measure.store_record(ref, split, idx["reference"]),
        "candidate": measure.store_record(cand, vc.selection.candidate_split, idx["candidate"]),
    }
    if training is not None:
        inputs["training"] = training
    k = vc.figures.sample_maps if vc.figures.enabled else 0
    samples = (ref.read(idx["reference"][:k]), cand.read(idx["candidate"][:k])) if k > 0 else None
    return Measured(sc, stats, idx, result, mem, inputs, samples, ref.channels, ref.npix, seconds, field)


#: Below this many maps per set the default verdict detects only large departures (docs/validation.md: detection table).
LOW_POWER_MAPS = 200


def low_power_warnings(ref: MapStore, split: str, n_reference: int, n_candidate: int) -> list[str]:
    """``low power: ...`` lines for small sets: a PASS then says little (the verdict stays calibrated)."""
    out = []
    for what, n in (("reference", n_reference), ("candidate", n_candidate)):
        if n < LOW_POWER_MAPS:
            where = (
                f" (the {split} split, {n} of the store's {ref.n} maps)"
                if what == "reference" and split != "all"
                else ""
            )
            out.append(
                f"low power: the {what} set has {n} maps{where}, fewer than {LOW_POWER_MAPS}; the verdict keeps its "
                "false-alarm rate but detects only large departures (σ_8 ± 2 % needs ~1,000 maps per set)"
            )
    return out


def validate(cfg: Any) -> dict[str, Any]:
    """Validate a candidate store against a reference store (conf/validate.yaml describes ``cfg``).

    Returns the summary (as written to ``summary.json``) with ``pass`` and ``out`` (the output folder).
    Raises ``ValueError`` (one line naming the argument or file) on bad input, before any work.
    """
    vc = ValidationRequest.from_config(cfg)
    with target_lock(vc.out):  # one validation per output folder at a time
        return _validate(vc)


def _validate(vc: ValidationRequest) -> dict[str, Any]:
    t_start = time.time()
    if (vc.out / SUMMARY_FILE).exists() and not vc.overwrite:
        raise FileExistsError(f"out: {vc.out} already holds a validation; pass overwrite=true to replace it")
    if vc.notebook.execute:
        check_notebook(vc.notebook.path)  # fail before the work, not after it
    warnings: list[str] = []
    with open_store(vc.selection.reference) as ref, open_store(vc.selection.candidate) as cand:
        m = _measure(vc, ref, cand, warnings)
    vc.out.mkdir(parents=True, exist_ok=True)
    bins, edges = summary_bins(m.config, m.npix, m.channels), kappa_edges(m.config)
    figures: dict[str, Any] = {"statistics": {}, "correlations": {}}
    if vc.figures.enabled:
        figures = draw_validation_figures(
            vc.out,
            m.result,
            m.stats["reference"],
            m.stats["candidate"],
            bins,
            channels=m.channels,
            cross=m.config.cross,
            units=m.config.bin_units,
            pixel_arcmin=m.config.pixel_arcmin,
            samples=m.samples,
            memorization=m.memorization,
            dpi=vc.figures.dpi,
        )
    write_measured(vc.out, m, bins, edges)
    summary = summary_record(vc, m, bins, edges, figures, warnings)
    summary["timings"]["total_s"] = time.time() - t_start
    write_summary(vc.out, summary)
    write_text(vc.out / REPORT_FILE, render_html(summary, vc.out))
    if vc.notebook.execute:
        _run_notebook(vc, summary)
    for w in summary["warnings"]:  # every warning of summary.json also on the console
        log.warning("warning: %s", w)
    log.debug(verdict_lines(summary, vc.out / REPORT_FILE))  # the command prints it on stdout
    summary["out"] = str(vc.out)
    return summary


def _run_notebook(vc: ValidationRequest, summary: dict[str, Any]) -> None:
    """Execute the report notebook; a broken notebook run is a warning, never a hidden verdict."""
    try:
        summary["files"].update(execute_notebook(vc.out, vc.notebook.path, vc.notebook.timeout))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the verdict is already written; the notebook is an extra
        summary["warnings"].append(
            f"notebook execution failed: {e.__class__.__name__}: {' '.join(str(e).split())[:500]}"
        )
        log.warning("warning: %s", summary["warnings"][-1])
    write_summary(vc.out, summary)


def verdict_text(summary: dict[str, Any]) -> str:
    """The command's result on stdout (``validate ... | grep PASS``): the verdict lines of a summary."""
    return verdict_lines(summary, Path(summary["out"]) / REPORT_FILE)
