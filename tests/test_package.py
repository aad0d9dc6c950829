"""Packaging and layering: the floors import only downwards, only cli.py prints or exits, configs ship with the
package, each command's --help is its own."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lensflow"

#: The ground floor (design §6.2 rule 6): never Hydra, never Lightning, never an upper floor.
GROUND = [
    "lensflow._util",
    "lensflow.sims",
    "lensflow.flows",
    "lensflow.stats",
    "lensflow.compare",
    "lensflow.mapstore",
    "lensflow.fitsio",
    "lensflow.provenance",
    "lensflow.checkpoint",
    "lensflow.conditioning",
    "lensflow.model",
    "lensflow.report",
]
#: What the ground floor must not pull in: the frameworks and every upper-floor module of lensflow.
HIGHER = [
    "hydra",
    "omegaconf",
    "lightning",
    "pytorch_lightning",
    "wandb",
    "lensflow.cli",
    "lensflow.confstore",
    "lensflow.train",
    "lensflow.generate",
    "lensflow.validate",
    "lensflow.simulate",
    "lensflow.ingest",
    "lensflow.run_experiment",
    "lensflow.bench",
    "lensflow.simulation",
    "lensflow.ingestion",
    "lensflow.training",
    "lensflow.generation",
    "lensflow.validation",
    "lensflow.inference",
    "lensflow.workflow",
]
#: report/ draws and renders; it never reaches back into the jobs that call it.
REPORT_MUST_NOT_IMPORT = [
    "lensflow.training",
    "lensflow.generation",
    "lensflow.validation",
    "lensflow.simulation",
    "lensflow.ingestion",
    "lensflow.workflow",
]
#: Each command module is a thin ``verb.py`` over its job package: it imports only that package, _util and cli.
COMMAND_IMPORTS = {
    "lensflow.train": ["lensflow.training"],
    "lensflow.generate": ["lensflow.generation"],
    "lensflow.validate": ["lensflow.validation"],
    "lensflow.infer": ["lensflow.inference"],
    "lensflow.export": ["lensflow.model"],
    "lensflow.simulate": ["lensflow.simulation"],
    "lensflow.ingest": ["lensflow.ingestion"],
    "lensflow.run_experiment": ["lensflow.workflow"],
}


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError):  # a parent that is a module, not a package
        return False


def _imported_after(modules: list[str]) -> list[str]:
    """Every module in sys.modules after importing ``modules`` and all their submodules, in a fresh interpreter."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {modules!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(getattr(mod, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_ground_floor_imports_no_higher_floor():
    assert all(_exists(m) for m in GROUND), [m for m in GROUND if not _exists(m)]
    bad = sorted(m for m in _imported_after(GROUND) if _under(m, HIGHER))
    assert bad == [], f"ground floor pulled in: {bad}"


def test_report_imports_no_job_package():
    bad = sorted(m for m in _imported_after(["lensflow.report"]) if _under(m, REPORT_MUST_NOT_IMPORT))
    assert bad == [], f"lensflow.report pulled in: {bad}"


def _lensflow_imports(path: Path) -> set[str]:
    """The lensflow modules a file imports anywhere (module level or inside functions), from its AST."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    pkg = here.rsplit(".", 1)[0] if path.name != "__init__.py" else here
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lensflow"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lensflow":
                continue
            # `from lensflow import cli` imports the module lensflow.cli
            out |= {f"{mod}.{a.name}" if _exists(f"{mod}.{a.name}") else mod for a in node.names}
    return out


@pytest.mark.parametrize("command", sorted(COMMAND_IMPORTS))
def test_command_module_imports_only_its_package_util_and_cli(command):
    allowed = COMMAND_IMPORTS[command]
    path = PKG / (command.split(".", 1)[1] + ".py")
    allowed = [*allowed, "lensflow._util", "lensflow.cli"]
    bad = sorted(m for m in _lensflow_imports(path) if m != "lensflow" and not _under(m, allowed))
    assert bad == [], f"{command} imports {bad}; a command imports only {allowed}"


def _library_files() -> list[Path]:
    files = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if rel == "lensflow/cli.py":
            continue
        files.append(p)
    return files


def _forbidden_calls(path: Path) -> list[str]:
    """``print(...)``, ``sys.exit(...)``, ``exit(...)`` and ``hydra.main(...)`` calls (decorators included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {"print", "exit", "quit"}
    attrs = {("sys", "exit"), ("hydra", "main")}
    from_hydra = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "hydra"
                  for a in n.names if a.name == "main"}  # fmt: skip
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and (f.id in names or f.id in from_hydra):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {f.id}()")
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in attrs:
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {f.value.id}.{f.attr}()")
    return out


def test_library_code_never_prints_exits_or_runs_hydra():
    """Only lensflow/cli.py prints, exits or calls hydra.main; library code logs and raises (design §6.2 rule 2)."""
    files = _library_files()
    assert PKG / "simulate.py" in files and PKG / "stats" / "summary.py" in files
    bad = [c for p in files for c in _forbidden_calls(p)]
    assert bad == [], "\n".join(bad)


def test_the_forbidden_call_finder_finds_them(tmp_path):
    p = ROOT / "tests" / "_probe_calls.py"
    try:
        p.write_text("import sys\nimport hydra\nfrom hydra import main as m\n@hydra.main()\ndef f():\n"
                     "    print(1)\n    sys.exit(2)\n    m()\n")  # fmt: skip
        found = _forbidden_calls(p)
    finally:
        p.unlink()
    assert [c.split(" ", 1)[1] for c in found] == sorted(
        ["hydra.main()", "print()", "sys.exit()", "m()"], key=["hydra.main()", "print()", "sys.exit()", "m()"].index
    )


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


#: (command, words of its description, one of its own keys, words that belong to other commands only)
HELP = [
    (
        "simulate",
        "Simulate κ maps into a map store",
        "pixel_arcmin:",
        ["trainer", "optim", "callbacks", "bench", "ckpt"],
    ),
    ("ingest", "Ingest external κ maps", "healpix:", ["trainer", "optim", "callbacks", "bench", "sim:", "ckpt"]),
    ("generate", "Draw mock κ maps from a trained Glow", "temperature:", ["trainer", "optim", "callbacks", "bench"]),
    ("validate", "Measure the same statistics", "reference:", ["trainer", "optim", "callbacks", "bench", "ckpt:"]),
    (
        "train",
        "Train a Glow normalizing flow",
        "trainer:",
        ["bench:", "suite:", "reference:", "fits_layout", "healpix"],
    ),
    ("bench", "Benchmark lensflow against a named baseline", "suite:", ["trainer", "optim", "callbacks", "ckpt"]),
]


@pytest.mark.parametrize(("command", "says", "key", "foreign"), HELP, ids=[h[0] for h in HELP])
def test_help_describes_the_command_and_lists_only_its_own_groups_and_keys(run_command, command, says, key, foreign):
    """``python -m lensflow.X --help`` (issue 13: generate's listed trainer, optim, callbacks and bench)."""
    main = importlib.import_module(f"lensflow.{command}").main
    res = run_command(main, "--help")
    text = "\n".join(res.out)
    assert res.code == 0, res.err
    assert says in text and key in text and f"python -m lensflow.{command}" in text
    for word in foreign:
        assert word not in text, f"{command} --help mentions {word!r}"


def test_version_and_the_list_of_commands():
    import lensflow
    from lensflow.__main__ import COMMANDS

    run = [sys.executable, "-m", "lensflow"]
    out = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True).stdout
    assert out == f"lensflow {lensflow.__version__}\n" and lensflow.__version__ == "0.2.0"
    usage = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert usage.count("\n") == 1 and all(c in usage for c in COMMANDS)
    assert all(_exists(f"lensflow.{c}") for c in COMMANDS)  # every command listed is runnable
    bad = subprocess.run([*run, "--versoin"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("error: '--versoin'")
    assert bad.stderr.count("\n") == 1
