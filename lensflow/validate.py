"""``python -m lensflow.validate reference=sims.h5 candidate=mocks.h5 out=reports/NAME [key=value ...]``.

The command (config ``conf/validate.yaml``): :func:`lensflow.validation.validate` behind
:func:`lensflow.cli.command`. Exit code 0 when every statistic and the memorisation check pass, 1 when
one fails, 2 on bad input (one line ``error: ...`` on stderr). The verdict is printed on stdout, warnings on stderr.

The old names of this module (the measurement, the stats file, figures, HTML, notebook) are
re-exported from :mod:`lensflow.validation`; the figure, HTML and notebook names resolve lazily from
:mod:`lensflow.report` with a ``DeprecationWarning`` (a command module imports only its own job), for one release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lensflow import cli
from lensflow.validation.measure import (
    build_summary_config,
    compute_statistics,
    select_indices,
    statistics_of,
    summary_config_for,
)
from lensflow.validation.run import validate, verdict_text
from lensflow.validation.statsfile import load_report, read_stats, write_stats

__all__ = [
    "build_summary_config",
    "compute_statistics",
    "load_report",
    "main",
    "read_stats",
    "select_indices",
    "statistics_of",
    "summary_config_for",
    "validate",
    "write_stats",
]


#: Old names of this module that moved to the report package.
_MOVED = {
    **dict.fromkeys(
        ("feature_groups", "plot_correlation", "plot_nearest_neighbour", "plot_sample_maps", "plot_statistic"),
        "lensflow.report.figures",
    ),
    "render_html": "lensflow.report.html",
    "verdict_table_html": "lensflow.report.html",
    "execute_notebook": "lensflow.report.notebook",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"lensflow.validate.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lensflow.validate' has no attribute {name!r}")


def _exit_code(summary: dict[str, Any]) -> int:
    return 0 if summary["pass"] else 1


main = cli.command("validate", validate, result_code=_exit_code, open_nodes=("select",), render=verdict_text)


def _select_overrides(args: list[str]) -> list[str]:
    """Old argv rewrite (``select.NAME=v`` → ``+select.NAME=v``); :func:`lensflow.cli.command` does this now."""
    return [f"+{a}" if a.startswith("select.") else a for a in args]


if __name__ == "__main__":
    main()
