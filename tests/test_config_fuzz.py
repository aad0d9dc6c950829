"""Config-key fuzz (issue 27): every command, every top-level key misspelled by one letter (deterministic: the last
letter dropped), with and without ``+`` and ``++``, and wrong types of typed keys. Each must be refused with exit 2
and one ``error:`` line naming the misspelled key and the nearest valid one (for a wrong type: the key). In process
(the commands' ``main`` with argv): the refusals happen before any work. The default run takes each key once, its
spelling turning with the key (~100 cases, ~50 s on 2 cores); ``LENSFLOW_FAULTS=full`` runs all three spellings.
"""

from __future__ import annotations

import os

import pytest

import lensflow.bench
import lensflow.generate
import lensflow.infer
import lensflow.ingest
import lensflow.simulate
import lensflow.train
import lensflow.validate
from lensflow import cli

COMMANDS = {
    "simulate": lensflow.simulate.main,
    "ingest": lensflow.ingest.main,
    "generate": lensflow.generate.main,
    "validate": lensflow.validate.main,
    "infer": lensflow.infer.main,
    "train": lensflow.train.main,
    "bench": lensflow.bench.main,
}


def _typos(name: str) -> list[tuple[str, str]]:
    """(misspelled, original) for each top-level key of config ``name`` whose misspelling is no valid key."""
    keys = [k for k in cli.compose(name).keys() if k != "hydra"]
    return [(k[:-1], k) for k in keys if len(k) > 1 and k[:-1] not in keys]


FULL = os.environ.get("LENSFLOW_FAULTS", "") == "full"
PREFIXES = ("", "+", "++")

#: Every key of every command once, the spelling (plain, +, ++) turning with the key; LENSFLOW_FAULTS=full: all three.
CASES = [
    pytest.param(
        name,
        typo,
        key,
        prefix,
        id=f"{name}-{prefix or 'plain'}{typo}",
        marks=() if prefix == PREFIXES[i % 3] else [pytest.mark.slow, pytest.mark.skipif(not FULL, reason="full")],
    )
    for name in COMMANDS
    for i, (typo, key) in enumerate(_typos(name))
    for prefix in PREFIXES
]


@pytest.fixture(autouse=True)
def _here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _one_line(res) -> str:
    code, err = res
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(("name", "typo", "key", "prefix"), CASES)
def test_misspelled_key_names_the_nearest_valid_one(name, typo, key, prefix, run_command):
    line = _one_line(run_command(COMMANDS[name], f"{prefix}{typo}=1"))
    assert f"unknown key '{typo}'" in line and f"did you mean '{key}'" in line, line


def test_every_command_and_key_is_covered():
    assert {c.values[0] for c in CASES} == set(COMMANDS)
    assert len(CASES) >= 3 * 60  # ~70 top-level keys over the commands, three spellings each


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        ("simulate", ["n_maps=many"], "n_maps"),
        ("simulate", ["npix=1.5"], "npix"),
        ("simulate", ["overwrite=maybe"], "overwrite"),
        ("ingest", ["input=x.npy", "overwrite=maybe"], "overwrite"),
        ("ingest", ["input=x.npy", "pixel_arcmin=wide"], "pixel_arcmin"),
        ("generate", ["ckpt=x.ckpt", "n_maps=many"], "n_maps"),
        ("generate", ["ckpt=x.ckpt", "temperature=hot"], "temperature"),
        ("validate", ["reference=a.h5", "candidate=b.h5", "out=o", "max_maps=many"], "max_maps"),
        ("validate", ["reference=a.h5", "candidate=b.h5", "out=o", "batch_size=many"], "batch_size"),
        ("infer", ["ckpt=x.ckpt", "maps=a.h5", "out=o", "grid_points=many"], "grid_points"),
        ("infer", ["ckpt=x.ckpt", "maps=a.h5", "out=o", "joint=maybe"], "joint"),
        ("train", ["model.hidden=big"], "model.hidden"),
        ("train", ["model.coupling=cubic"], "model.coupling"),
        ("train", ["trainer.max_steps=many"], "max_steps"),
    ],
)
def test_wrong_types_name_the_key(name, args, key, run_command, tmp_path):
    extra = [f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"] if name == "train" else []
    line = _one_line(run_command(COMMANDS[name], *args, *extra))
    assert key in line, line
