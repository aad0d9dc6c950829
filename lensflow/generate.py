"""Batch generation of mock κ maps from a trained Glow checkpoint: ``python -m lensflow.generate``.

::

    python -m lensflow.generate ckpt=runs/kappa/best.ckpt n_maps=10000 out=mocks.h5
    python -m lensflow.generate ckpt=cond.ckpt n_maps=500 cond.Omega_m=[0.25,0.3] cond.sigma_8=0.8 out=grid.h5

The work is :func:`lensflow.generation.generate`. Exit code 0 done, 1 sampling failed (a map stayed non-finite),
2 bad input.
"""

from __future__ import annotations

from lensflow import cli
from lensflow.generation import generate
from lensflow.generation.run import written_line

__all__ = ["generate", "main"]


main = cli.command("generate", generate, open_nodes=("cond",), render=written_line)

if __name__ == "__main__":
    main()
