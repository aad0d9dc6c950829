"""Shared command-line wrapper for the entry points: one ``error:`` line and exit code 2 on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line."""
    msg = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return msg or type(e).__name__


def precheck(config_name: str, overrides: list[str]) -> None:
    """Compose the config once before Hydra runs, so typos give one ``error:`` line and exit code 2."""
    if any(a.startswith("-") for a in overrides):
        return  # --help, --cfg, --multirun, ...: leave them to Hydra
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        with initialize_config_module(config_module="lensflow.conf", version_base="1.3"):
            compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        msg = one_line(e).split("Config search path:")[0]
        msg = msg.replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "")
        msg = msg.replace("Available options in", "; available options in")
        print(f"error: config: {msg.strip()}", file=sys.stderr)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()


def hydra_cli(config_name: str, fn: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A ``main()`` that runs ``fn(cfg)`` under Hydra and prints its result (if not None).

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
        if result is not None:
            print(result)

    def main() -> None:
        precheck(config_name, sys.argv[1:])
        try:
            _hydra_main()
        except SystemExit as e:
            if not entered and e.code not in (0, None):
                sys.exit(2)
            raise

    return main
