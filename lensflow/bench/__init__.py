"""Benchmarks: lensflow against a named baseline, measured on the same machine in one run.

Each suite ``NAME`` is a module ``lensflow.bench.NAME`` with ``run(cfg: dict) -> list[dict]``;
its defaults live in ``conf/bench/NAME.yaml``. Every row names the variant, the baseline it is
compared with, the value with its unit, and the ratio lensflow / baseline. The console table is built
here (:func:`format_table`, :func:`render`) until ``lensflow.report.text`` takes the renderers.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lensflow import cli
from lensflow._util.atomic import write_json
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain
from lensflow.provenance import provenance

log = get_logger(__name__)

_COLUMNS = ("benchmark", "device", "variant", "baseline", "value", "unit", "ratio")


def machine() -> dict[str, Any]:
    """A short description of the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table (numbers to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cols = list(_COLUMNS) + sorted({k for r in rows for k in r} - set(_COLUMNS))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def suite_config(cfg: Mapping[str, Any], keys: tuple[str, ...], suite: str) -> dict[str, Any]:
    """A suite's config as a plain dict (``suite`` dropped): exactly the keys of ``conf/bench/<suite>.yaml``."""
    c = {k: v for k, v in to_plain(cfg).items() if k != "suite"}
    unknown = sorted(set(c) - set(keys))
    if unknown:
        raise ValueError(f"bench {suite}: unknown keys {unknown}")
    missing = sorted(set(keys) - set(c))
    if missing:
        raise ValueError(f"bench {suite}: missing keys {missing} (conf/bench/{suite}.yaml has them all)")
    return c


@dataclass(frozen=True)
class BenchResult:
    """What one ``bench`` run measured: the suite, the machine, the rows, and where the rows were saved."""

    suite: str
    machine: dict[str, Any]
    rows: list[dict[str, Any]]
    out: Path | None = None


def bench(cfg: DictConfig | Mapping[str, Any]) -> BenchResult:
    """Run the suite named by ``cfg.bench.suite``; with ``cfg.out`` also save the rows as JSON."""
    c = to_plain(cfg)
    suite_cfg = dict(c["bench"])
    suite = str(suite_cfg.pop("suite"))
    try:
        module = importlib.import_module(f"lensflow.bench.{suite}")
    except ModuleNotFoundError as e:
        raise ValueError(f"bench: unknown suite {suite!r}") from e
    mach = machine()
    log.info("lensflow bench %s: running", suite)
    rows = module.run(suite_cfg)
    out = None
    if c.get("out"):
        out = write_json(
            c["out"],
            to_plain(
                {"suite": suite, "machine": mach, "rows": rows, "provenance": provenance(suite_cfg)}, nan_to_none=True
            ),
            indent=2,
        )
    return BenchResult(suite, mach, rows, out)


def render(result: BenchResult) -> str:
    """The console text of a bench run: the machine line, the table, and where the rows went."""
    m = result.machine
    head = (
        f"# lensflow bench {result.suite} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} threads)" + (f", GPU {m['gpu']}" if m["gpu"] else "")
    )
    lines = [head, format_table(result.rows)]
    if result.out is not None:
        lines.append(f"# rows written to {result.out}")
    return "\n".join(lines)


main = cli.command("bench", bench, render=render, first_word="bench")
