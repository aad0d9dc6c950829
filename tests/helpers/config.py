"""Composed configs and in-process command runs: the one way tests build a command's config or run its CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lensflow import cli


def compose(name: str, *overrides: str, **values: Any) -> DictConfig:
    """The composed root config ``name`` (``conf/<name>.yaml``) as the CLI builds it, with Hydra ``overrides``
    (``"model.steps=8"``) and then ``values`` set as they are (``cond={"Omega_m": [0.25, 0.35]}``, paths,
    lists: no override quoting needed)."""
    cfg = cli.compose(name, list(overrides))
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def plain(name: str, *overrides: str, **values: Any) -> dict[str, Any]:
    """:func:`compose` as plain Python containers (interpolations resolved)."""
    return OmegaConf.to_container(compose(name, *overrides, **values), resolve=True)


class CommandResult(tuple):
    """``(exit code, stderr lines)`` of one command run; ``.out`` holds the stdout lines."""

    def __new__(cls, code: int, err: list[str], out: list[str]) -> CommandResult:
        self = super().__new__(cls, (code, err))
        self.out = out
        return self

    @property
    def code(self) -> int:
        return self[0]

    @property
    def err(self) -> list[str]:
        return self[1]


def run_main(main: Callable[[], None], args: list[str], monkeypatch: Any, capsys: Any) -> CommandResult:
    """Run a command's ``main()`` in this process with ``args`` as its command line."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(sys, "argv", ["lensflow", *args])
    GlobalHydra.instance().clear()
    capsys.readouterr()  # drop what came before
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    return CommandResult(code, captured.err.strip().splitlines(), captured.out.strip().splitlines())
