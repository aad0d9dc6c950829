"""Console text of ``python -m lensflow.train``: what the run left where, and the final check's numbers.

(Meant for :mod:`lensflow.report.text`; it lives here until that module takes it.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["train_summary_text"]


def _pct(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


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
            f"  vs {s['n_reference_maps']} validation maps, |fractional error of the mean| max / mean over bins:"
        )
        lines.append(f"    C_ell        {_pct(c.get('cl_frac_max'))} / {_pct(c.get('cl_frac_mean'))}")
        lines.append(f"    peak counts  {_pct(c.get('peaks_frac_max'))} / {_pct(c.get('peaks_frac_mean'))}")
        lines.append(f"    pixel PDF    {_pct(c.get('pdf_frac_max'))} / {_pct(c.get('pdf_frac_mean'))}")
        v = s.get("validate") or {}
        if v.get("pass") is not None:
            note = " (fewer than 1,000 maps per set: noise-limited)" if v.get("noise_limited") else ""
            lines.append(
                f"  validate's full comparison, {v['n_candidate']} samples vs {v['n_reference']} validation maps: "
                f"{'PASS' if v['pass'] else 'FAIL'}{note}"
            )
            lines += [f"    {f}" for f in v.get("failures", [])[:5]]
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
