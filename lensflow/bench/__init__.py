"""Benchmarks: lensflow against a named baseline, measured on the same machine in one run.

Each suite ``NAME`` is a module ``lensflow.bench.NAME`` with ``run(cfg: dict) -> list[dict]``;
its defaults live in ``conf/bench/NAME.yaml``. Every row names the variant, the baseline it is
compared with, the value with its unit, and the ratio lensflow / baseline.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lensflow.cli import hydra_cli
from lensflow.provenance import provenance

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


def bench(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the suite named by ``cfg.bench.suite`` and print its rows with the machine description."""
    suite_cfg = OmegaConf.to_container(cfg.bench, resolve=True)
    assert isinstance(suite_cfg, dict)
    suite = str(suite_cfg.pop("suite"))
    try:
        module = importlib.import_module(f"lensflow.bench.{suite}")
    except ModuleNotFoundError as e:
        raise ValueError(f"bench: unknown suite {suite!r}") from e
    mach = machine()
    print(
        f"# lensflow bench {suite} on {mach['cpu']} ({mach['cores']} cores, torch {mach['torch']}, "
        f"{mach['torch_threads']} threads)" + (f", GPU {mach['gpu']}" if mach["gpu"] else ""),
        flush=True,
    )
    rows = module.run(suite_cfg)
    print(format_table(rows), flush=True)
    if cfg.get("out"):
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"suite": suite, "machine": mach, "rows": rows, "provenance": provenance(suite_cfg)}, indent=2)
        )
        print(f"# rows written to {out}")
    return rows


def _print_only(cfg: DictConfig) -> None:
    bench(cfg)  # prints its own table


main = hydra_cli("bench", _print_only)
