"""``python -m lensflow [--version]``: the version, or a one-line list of the commands (``python -m lensflow.X``)."""

from __future__ import annotations

from collections.abc import Callable

from lensflow import __version__, cli

__all__ = ["COMMANDS", "main"]

#: The commands, in the order of a run (each is ``python -m lensflow.<name> key=value ...``, ``--help`` for more).
COMMANDS = ("simulate", "ingest", "train", "generate", "validate", "infer", "export", "bench", "run_experiment")

USAGE = f"usage: python -m lensflow.COMMAND [key=value ...]  (COMMAND: {', '.join(COMMANDS)}; --version)"


def _run(argv: list[str], echo: Callable[[str], None]) -> int:
    if argv in (["--version"], ["-V"]):
        echo(f"lensflow {__version__}")
        return 0
    if argv and argv[0] not in ("-h", "--help"):
        raise ValueError(f"{argv[0]!r}: not an option of python -m lensflow; {USAGE.removeprefix('usage: ')}")
    echo(USAGE)
    return 0


main = cli.argv_command(_run)

if __name__ == "__main__":
    cli.exit_with(main)
