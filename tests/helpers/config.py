"""Composed configs and in-process command runs: the one way tests build a command's config or run its CLI;
the override lists that shrink an experiment to seconds."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lensflow import cli

#: Shrinks any training experiment to seconds (``compose("train", "+experiment=kappa", *TINY_TRAIN)``): the
#: :data:`helpers.stores.TINY_SPEC` store (400 maps 32x32, massless neutrinos), a 1-step Glow, 3 steps, a check.
TINY_TRAIN: list[str] = [
    "logger=csv",
    "trainer=cpu",
    "data.simulate.n_maps=400",
    "data.simulate.npix=32",
    "data.simulate.pixel_arcmin=3.28",
    "data.simulate.sim.cosmology.m_nu=0.0",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.max_val_maps=32",
    "model.levels=2",
    "model.steps=1",
    "model.hidden=8",
    "optim.warmup_steps=2",
    "trainer.max_steps=3",
    "trainer.limit_train_batches=3",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "check.every=1",
    "check.n_samples=16",
    "check.batch_size=16",
]

#: Shrinks the kappa_quick experiment of ``python -m lensflow.run_experiment`` to seconds, every stage of it: 60
#: maps 16x16, a 2-step Glow trained 4 steps, 16 maps validated on C_ell and the PDF, no progress bars.
TINY_PIPELINE: list[str] = [
    "+experiment=kappa_quick",
    "data.simulate.n_maps=60",
    "data.simulate.npix=16",
    "data.simulate.pixel_arcmin=4.0",
    "data.simulate.sim.cosmology.m_nu=0.0",
    "model.levels=2",
    "model.steps=2",
    "model.hidden=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "data.batch_size=8",
    "data.norm_maps=32",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "check.n_samples=8",
    "validate.max_maps=16",
    "validate.statistics=[cl,pdf]",
    "validate.smoothing_arcmin=[8.0]",
    "validate.memorization.enabled=false",
    "validate.figures.sample_maps=2",
    "validate.progress=false",
    "generate.progress=false",
    "generate.accelerator=cpu",
]


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
