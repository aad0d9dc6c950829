"""One default per knob: the YAML under conf/ takes the Python tables as nodes (lensflow.confstore), never restates
them, and composing a command imports only the tables it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lensflow.confstore import NODES, ROOTS, node

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _node_entries(path: Path) -> list[tuple[str, str]]:
    """``(node, package)`` of every ``/lensflow/<group>@<package>: <name>`` entry of a YAML file's defaults list."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    out = []
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict) and len(entry) == 1:
            ((key, name),) = entry.items()
            group, _, package = str(key).lstrip("/").partition("@")
            if group.startswith("lensflow/"):
                out.append((f"{group[len('lensflow/') :]}/{name}", package))
    return out


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def test_no_yaml_restates_a_python_default():
    """A YAML file that takes a node sets none of its keys: the value lives in Python only. Every node is taken."""
    taken = set()
    for path in sorted(CONF.rglob("*.yaml")):
        for name, package in _node_entries(path):
            assert name in NODES, f"{path.relative_to(ROOT)}: unknown node {name}"
            taken.add(name)
            own = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            own.pop("defaults", None)
            if package not in ("", "_here_"):
                own = own.get(package) or {}
            restated = sorted(_leaves(node(name)) & _leaves(own))
            assert not restated, f"{path.relative_to(ROOT)} restates {restated} of {NODES[name][:2]}"
    assert taken == set(NODES)


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_each_command_composes_in_a_fresh_process_and_only_training_imports_lightning(root):
    """ROOTS names every node a root config composes (a fresh process registers only those), and drawing, scoring
    and validating maps never import Lightning to fill their defaults."""
    code = (
        "import sys; from lensflow.cli import compose; "
        f"cfg = compose({root!r}); print(len(cfg)); print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    n, lightning = out.stdout.split()
    assert int(n) > 1
    if root in ("generate", "validate", "infer", "ingest", "simulate"):
        assert lightning == "False", f"{root} imported Lightning"


def test_a_node_is_a_fresh_copy():
    a = node("validate/default")
    a["bins"]["ell_nbins"] = 3
    assert node("validate/default")["bins"]["ell_nbins"] == 20
