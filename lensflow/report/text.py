"""Console text: plain functions from result dicts to the lines a command shows (no printing here).

``validate``'s verdict, the pipeline's progress lines and ``train``'s summary of a finished run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from lensflow.compare.tolerances import CHECK_TARGETS, POPULATED_SE

__all__ = ["pipeline_line", "pipeline_stage_line", "train_summary_text", "verdict_lines"]


def verdict_lines(summary: Mapping[str, Any], report: str | os.PathLike) -> str:
    """A validation's verdict: ``PASS: k/n checks pass; report PATH``, then one indented line per failure."""
    verdicts = {**summary["verdicts"], **(summary.get("gates") or {})}
    head = f"{'PASS' if summary['pass'] else 'FAIL'}: {sum(bool(v) for v in verdicts.values())}/{len(verdicts)} "
    lines = [f"{head}checks pass; report {report}", *(f"  {f}" for f in summary["failures"])]
    lines += [f"  warning: {w}" for w in summary.get("low_power") or []]
    return "\n".join(lines)


def pipeline_stage_line(stage: str, run: bool, why: str) -> str:
    """One stage of the pipeline's plan: ``[pipeline] STAGE run |skip (why)``."""
    return pipeline_line(f"{stage:<9} {'run ' if run else 'skip'} ({why})")


def pipeline_line(text: str) -> str:
    """A line of the pipeline's progress: ``[pipeline] TEXT``."""
    return f"[pipeline] {text}"


def _pct(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


def _error_line(c: Mapping[str, Any], key: str) -> str:
    """``"max |z| 1.9; worst of 9 well-populated bins 3.1% (target 5%)"`` of one statistic."""
    z, target = c.get(f"{key}_z_max"), CHECK_TARGETS[key]
    zs = "nan" if z is None or not math.isfinite(z) else f"{z:.1f}"
    n = int(c.get(f"{key}_populated_bins") or 0)
    if n == 0:
        return f"max |z| {zs}; no bin measured to ±{_pct(POPULATED_SE * target)} with these maps (draw more to judge)"
    worst = _pct(c.get(f"{key}_frac_populated_max"))
    return f"max |z| {zs}; worst of {n} well-populated bins {worst} (target {_pct(target)})"


def train_summary_text(result: Mapping[str, Any]) -> str | None:
    """The lines a finished run prints (``None`` on ranks other than 0, which print nothing).

    ``result`` is :func:`lensflow.training.train`'s return value; with ``prepare_only`` it names the store.
    """
    if result.get("prepare_only"):
        return f"lensflow.train: training store ready: {result['store']} ({result['n_maps']} maps)"
    s = result.get("summary")
    if s is None:
        return None
    lines = ["", f"lensflow.train finished: {s['global_step']} steps in {s['train_seconds']:.0f} s"]
    lines.append(f"  run folder:       {s['run_dir']}")
    lines.append(f"  best checkpoint:  {s['best_checkpoint']}")
    lines.append(f"  last checkpoint:  {s['last_checkpoint']}")
    if s.get("best_val_bits_per_dim") is not None:
        lines.append(f"  best val bits/dim (EMA): {s['best_val_bits_per_dim']:.4f}")
    if s.get("samples"):
        c = s["check"]
        n_ok = int(c["n_samples"] - c["nonfinite_samples"])
        lines.append(f"  samples:          {s['samples']} ({n_ok} maps)")
        lines.append(
            f"  vs {s['n_reference_maps']} validation maps, the mean per bin (|z| = |error| / its standard error, "
            "≲ 3 when they agree):"
        )
        for key, label in (("cl", "C_ell"), ("peaks", "peak counts"), ("pdf", "pixel PDF")):
            lines.append(f"    {label:<12} {_error_line(c, key)}")
        v = s.get("validate") or {}
        if v.get("pass") is not None:
            note = " (fewer than 1,000 maps per set: noise-limited)" if v.get("noise_limited") else ""
            lines.append(
                f"  validate's full comparison, {v['n_candidate']} samples vs {v['n_reference']} validation maps: "
                f"{'PASS' if v['pass'] else 'FAIL'}{note}"
            )
            lines += [f"    {f}" for f in v.get("failures", [])[:5]]
            lines += [f"    warning: {w}" for w in v.get("warnings", [])]
        kl = s.get("kl") or {}
        if kl.get("available"):
            tr, tr_se = kl.get("train_kl_bits_per_dim", math.nan), kl.get("train_kl_se", math.nan)
            lines.append(
                f"  KL gap vs the exact likelihood: held-out {kl['val_kl_bits_per_dim']:.5f} ± {kl['val_kl_se']:.5f}, "
                f"training maps {tr:.5f} ± {tr_se:.5f} bits/pixel"
            )
        elif kl:
            lines.append(f"  KL gap: not available ({kl.get('reason')})")
        lines.append(f"  plots:            {', '.join(s.get('figures', {}).values())}")
    lines.append(f"  summary:          {result['summary_path']}")
    return "\n".join(lines)
