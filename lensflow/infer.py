"""``python -m lensflow.infer ckpt=PATH maps=STORE out=DIR [split=all] [max_maps=N] [joint=false]``: posteriors.

The command only: see :mod:`lensflow.inference`. Exit 0 done, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

from lensflow import cli
from lensflow.inference.run import infer, summary_text

__all__ = ["infer", "main"]

main = cli.command("infer", infer, render=summary_text, open_nodes=("prior",))

if __name__ == "__main__":
    main()
