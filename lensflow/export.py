"""``python -m lensflow.export ckpt=PATH out=PATH [overwrite=false]``: the trained model alone, to share.

Writes the EMA and raw weights, the normalisation, the training box and the training maps' metadata of a training
checkpoint (no optimizer state: about half the size) atomically to ``out``. :meth:`lensflow.model.KappaFlow.load`,
``lensflow.load`` and every command that takes ``ckpt=`` read it like the checkpoint, and ``torch.load(out,
weights_only=True)`` reads it without lensflow. Exit 0 done, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lensflow import cli
from lensflow.model import KappaFlow

__all__ = ["export", "main"]

USAGE = "usage: python -m lensflow.export ckpt=PATH out=PATH [overwrite=false]"


def export(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export the model of checkpoint ``ckpt`` to ``out`` (refused if it exists, unless ``overwrite``)."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"out: {out} exists; pass overwrite=true to replace it")
    return KappaFlow.load(Path(ckpt).expanduser()).save(out, overwrite=True)


def _run(argv: list[str], echo: Callable[[str], None]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        echo(USAGE)
        return 0
    args: dict[str, str] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in ("ckpt", "out", "overwrite"):
            raise ValueError(f"{a!r}: expected ckpt=PATH, out=PATH or overwrite=true|false ({USAGE})")
        args[key] = value
    for key in ("ckpt", "out"):
        if not args.get(key):
            raise ValueError(f"{key}: missing; {USAGE}")
    overwrite = args.get("overwrite", "false").lower()
    if overwrite not in ("true", "false"):
        raise ValueError(f"overwrite: expected true or false, got {args['overwrite']!r}")
    path = export(args["ckpt"], args["out"], overwrite == "true")
    echo(f"wrote {path}")
    return 0


main = cli.argv_command(_run)

if __name__ == "__main__":
    cli.exit_with(main)
