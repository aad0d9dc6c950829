"""``python -m lensflow.pipeline [KEY=VALUE ...] [--run-dir DIR] [--stages a,b] [--force a,b] [--dry-run]``."""

from __future__ import annotations

from lensflow import cli
from lensflow.pipeline.runner import run_pipeline

main = cli.argv_command(run_pipeline)

if __name__ == "__main__":
    cli.exit_with(main)
