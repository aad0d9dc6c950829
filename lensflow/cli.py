"""Shared command-line wrapper for the entry points: one ``error:`` line and exit code 2 on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def hydra_cli(config_name: str, fn: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A ``main()`` that runs ``fn(cfg)`` under Hydra and prints its result.

    Bad input (ValueError, OSError, config errors) prints one ``error: ...`` line and exits 2; so does
    a command line Hydra itself rejects (Hydra has already said why).
    """
    entered = False

    @hydra.main(config_path="pkg://lensflow.conf", config_name=config_name, version_base="1.3")
    def _hydra_main(cfg: DictConfig) -> None:
        nonlocal entered
        entered = True
        try:
            result = fn(cfg)
        except (ValueError, OSError, OmegaConfBaseException) as e:
            msg = str(e).strip().splitlines()
            print(f"error: {msg[0] if msg else e.__class__.__name__}", file=sys.stderr)
            sys.exit(2)
        print(result)

    def main() -> None:
        try:
            _hydra_main()
        except SystemExit as e:
            if not entered and e.code not in (0, None):
                sys.exit(2)
            raise

    return main
