"""Console text: plain functions from result dicts to the lines a command shows (no printing here)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["pipeline_line", "pipeline_stage_line", "verdict_lines"]


def verdict_lines(summary: Mapping[str, Any], report: str | os.PathLike) -> str:
    """A validation's verdict: ``PASS: k/n checks pass; report PATH``, then one indented line per failure."""
    verdicts = summary["verdicts"]
    head = f"{'PASS' if summary['pass'] else 'FAIL'}: {sum(bool(v) for v in verdicts.values())}/{len(verdicts)} "
    lines = [f"{head}checks pass; report {report}", *(f"  {f}" for f in summary["failures"])]
    return "\n".join(lines)


def pipeline_stage_line(stage: str, run: bool, why: str) -> str:
    """One stage of the pipeline's plan: ``[pipeline] STAGE run |skip (why)``."""
    return pipeline_line(f"{stage:<9} {'run ' if run else 'skip'} ({why})")


def pipeline_line(text: str) -> str:
    """A line of the pipeline's progress: ``[pipeline] TEXT``."""
    return f"[pipeline] {text}"
