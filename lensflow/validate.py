"""``python -m lensflow.validate reference=sims.h5 candidate=mocks.h5 out=reports/NAME [key=value ...]``.

The command (config ``conf/validate.yaml``): :func:`lensflow.validation.validate` behind
:func:`lensflow.cli.command`. Exit code 0 when every statistic and the memorisation check pass, 1 when
one fails, 2 on bad input (one line ``error: ...`` on stderr). The verdict is logged on stderr.

The old names of this module (the measurement, the stats file, figures, HTML, notebook) are
re-exported from :mod:`lensflow.validation` and :mod:`lensflow.report` for one release.
"""

from __future__ import annotations

from typing import Any

from lensflow import cli
from lensflow.report.figures import (
    feature_groups,
    plot_correlation,
    plot_nearest_neighbour,
    plot_sample_maps,
    plot_statistic,
)
from lensflow.report.html import render_html, verdict_table_html
from lensflow.report.notebook import execute_notebook
from lensflow.validation.measure import (
    build_summary_config,
    compute_statistics,
    select_indices,
    statistics_of,
    summary_config_for,
)
from lensflow.validation.run import validate
from lensflow.validation.statsfile import load_report, read_stats, write_stats

__all__ = [
    "build_summary_config",
    "compute_statistics",
    "execute_notebook",
    "feature_groups",
    "load_report",
    "main",
    "plot_correlation",
    "plot_nearest_neighbour",
    "plot_sample_maps",
    "plot_statistic",
    "read_stats",
    "render_html",
    "select_indices",
    "statistics_of",
    "summary_config_for",
    "validate",
    "verdict_table_html",
    "write_stats",
]


def _exit_code(summary: dict[str, Any]) -> int:
    return 0 if summary["pass"] else 1


main = cli.command("validate", validate, result_code=_exit_code, open_nodes=("select",))


def _select_overrides(args: list[str]) -> list[str]:
    """Old argv rewrite (``select.NAME=v`` → ``+select.NAME=v``); :func:`lensflow.cli.command` does this now."""
    return [f"+{a}" if a.startswith("select.") else a for a in args]


if __name__ == "__main__":
    main()
