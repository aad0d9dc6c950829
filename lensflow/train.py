"""Train a Glow emulator of κ maps: ``python -m lensflow.train [+experiment=NAME] [key=value ...]``.

::

    python -m lensflow.train +experiment=kappa_quick                 # CPU, < 10 min, simulates its data
    python -m lensflow.train +experiment=kappa                       # reference run, DDP over all GPUs
    python -m lensflow.train data.path=maps.h5 model.steps=8 trainer.max_steps=100
    python -m lensflow.train +experiment=kappa ckpt_path=<run>/checkpoints/last.ckpt   # resume exactly

The work is :func:`lensflow.training.train` (what lands where: :mod:`lensflow.training.run`). Bad input ends
with one line ``error: ...`` on stderr and exit code 2; a diverging run (non-finite losses) with exit code 1.
"""

from __future__ import annotations

from lensflow import cli
from lensflow.training import NonFiniteCheckpointError, TrainingDivergedError, train, train_summary_text

__all__ = ["main", "train"]

main = cli.command(
    "train",
    train,
    exit_codes={TrainingDivergedError: 1, NonFiniteCheckpointError: 1},
    render=train_summary_text,
    added_nodes=("trainer",),  # +trainer.KEY=v: checked against lightning.Trainer's arguments by the job
)

if __name__ == "__main__":
    main()
