"""``python -m lensflow.run_experiment [KEY=VALUE ...] [--run-dir DIR] [--stages a,b] [--force a,b] [--dry-run]``.

The job is :mod:`lensflow.workflow`: simulate → train → generate → validate → report, skipping the stages that are
up to date.
"""

from __future__ import annotations

from lensflow import cli
from lensflow.workflow.runner import run_pipeline

main = cli.argv_command(run_pipeline)

if __name__ == "__main__":
    cli.exit_with(main)
