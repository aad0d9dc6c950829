"""Packaging and layering: the ground floor stays free of Hydra and Lightning; configs ship with the package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUND = ["lensflow.mapstore", "lensflow.provenance", "lensflow.sims", "lensflow.flows", "lensflow.stats"]
HIGHER = [
    "hydra",
    "omegaconf",
    "lightning",
    "pytorch_lightning",
    "wandb",
    "lensflow.data",
    "lensflow.module",
    "lensflow.train",
    "lensflow.generate",
    "lensflow.validate",
    "lensflow.simulate",
    "lensflow.bench",
]


def test_ground_floor_imports_no_higher_floor():
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {GROUND!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(getattr(mod, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        f"bad = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in {HIGHER!r}))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"ground floor pulled in: {out.stdout}"


def test_every_config_group_is_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for d in sorted(p for p in (ROOT / "conf").rglob("*") if p.is_dir() and p.name != "__pycache__"):
        pkg = "lensflow.conf." + ".".join(d.relative_to(ROOT / "conf").parts)
        assert (d / "__init__.py").exists(), f"{d} needs an __init__.py to be found as {pkg}"
        assert pkg in listed, f"{pkg} is missing from pyproject's packages: Hydra would not find it in a wheel"


def test_configs_resolve_as_package_resources():
    from importlib.resources import files

    conf = files("lensflow.conf")
    assert (conf / "bench.yaml").is_file()


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(nb):
    doc = json.loads(nb.read_text())
    for cell in doc["cells"]:
        assert not cell.get("outputs"), f"{nb.name} has outputs; strip them before committing"
