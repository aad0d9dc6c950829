"""Shared test fixtures. The plain helpers behind them live in ``tests/helpers/`` (importable as ``helpers``):

- ``helpers.config``: :func:`compose` (a command's composed config), :func:`run_main` (a CLI run in process) and
  the override lists that shrink an experiment (``TINY_TRAIN``, ``TINY_PIPELINE``);
- ``helpers.stores``: tiny map stores (noise or simulated) and tiny trained checkpoints;
- ``helpers.fields``: the Gaussian random field and κ-like map makers;
- ``helpers.flow_checks``: the round-trip and brute-force log-det harness of every flow layer;
- ``helpers.cosmology``: the cosmologies the tests use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import config, stores


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, restored after. The tests measure correctness on small tensors;
    on a loaded 2-core machine OpenMP spins at every barrier, so two threads make each op cost milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh numpy generator seeded 0 for each test."""
    return np.random.default_rng(0)


@pytest.fixture
def compose():
    """:func:`helpers.config.compose`: ``compose("train", "model.steps=8", out=str(path))``."""
    return config.compose


@pytest.fixture
def run_command(monkeypatch, capsys):
    """Run a command in this process: ``code, err = run_command(lensflow.generate.main, "ckpt=...", ...)``
    (``err``: stderr lines; the result's ``.out`` holds the stdout lines)."""

    def run(main, *args: str) -> config.CommandResult:
        return config.run_main(main, list(args), monkeypatch, capsys)

    return run


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A simulated store of 400 lognormal 32x32 maps (``helpers.stores.TINY_SPEC``), made once per session."""
    return stores.simulated_store(tmp_path_factory.mktemp("tiny-store"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny unconditional GlowModule checkpoint trained 3 steps (``helpers.stores.tiny_checkpoint``)."""
    return stores.tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), "uncond", 1, (), periodic=True)
