"""The files of a validation folder: the ``stats.h5`` schema (write, read) and ``summary.json``.

``stats.h5`` holds the per-map statistics of both sets, so figures can be redrawn and metrics
recomputed without measuring again; :func:`load_report` reads a folder back for notebooks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import lensflow
from lensflow._util.atomic import atomic_path, ensure_free_space, write_json
from lensflow._util.plain import to_plain
from lensflow.compare import summary_rows
from lensflow.provenance import provenance
from lensflow.stats.summary import SummaryConfig
from lensflow.validation.config import ValidationRequest

__all__ = [
    "REPORT_FILE",
    "SCHEMA",
    "STATS_FILE",
    "SUMMARY_FILE",
    "Measured",
    "load_report",
    "read_stats",
    "summary_record",
    "write_measured",
    "write_stats",
    "write_summary",
]

SCHEMA = "lensflow-validation/1"
STATS_FILE = "stats.h5"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
_DISTANCES = ("candidate_distances", "heldout_distances")


@dataclass
class Measured:
    """What one validation measured: the content of ``stats.h5`` and the numbers of ``summary.json``.

    ``stats`` and ``indices`` are keyed ``reference``/``candidate``; ``result`` is the
    :func:`lensflow.compare.compare` result, ``memorization`` the memorisation record, ``inputs`` the
    stores' records, ``samples`` the maps drawn in ``sample_maps.png`` (or ``None``).
    """

    config: SummaryConfig
    stats: dict[str, dict[str, np.ndarray]]
    indices: dict[str, np.ndarray]
    result: dict[str, Any]
    memorization: dict[str, Any]
    inputs: dict[str, Any]
    samples: tuple[np.ndarray, np.ndarray] | None
    channels: int
    npix: int
    seconds: float
    field: dict[str, Any] | None = None


def write_stats(
    path: str | os.PathLike,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    bins: Mapping[str, np.ndarray],
    edges: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    indices: Mapping[str, np.ndarray] | None = None,
    distances: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write per-map statistics of both sets (atomically, with the umask's mode).

    Layout: ``/reference/<name>`` and ``/candidate/<name>`` float64 [N, F] (names as
    :func:`lensflow.stats.summarize`, e.g. ``cl``, ``peaks@2.0arcmin``); ``/bins/<name>`` the x value of
    each column (ℓ, ν or κ, moment order); ``/edges/<name>`` κ bin edges where binned;
    ``/indices/{reference,candidate}`` map indices in the stores; ``/memorization/*`` nearest-neighbour
    distances (κ units). Root attrs: ``schema`` and JSON ``summary_config``, ``reference``,
    ``candidate``. Not a map store: it holds statistics, not κ maps.
    """
    # HDF5 cannot close a file whose write failed (the interpreter crashes): refuse a full disk before writing
    groups = (reference, candidate, bins, edges, indices or {}, distances or {})
    ensure_free_space(path, sum(np.asarray(v).nbytes for g in groups for v in g.values() if not isinstance(v, Mapping)))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema"] = SCHEMA
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(to_plain(v, nan_to_none=True))
        for group, data in (
            ("reference", reference),
            ("candidate", candidate),
            ("bins", bins),
            ("edges", edges),
            ("indices", indices or {}),
            ("memorization", distances or {}),
        ):
            g = f.create_group(group)
            for k, v in data.items():
                g.create_dataset(k, data=np.asarray(v))
    return Path(path)


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``stats.h5`` written by :func:`write_stats`: a dict of its groups (name → array) and attrs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: statistics file not found")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not a readable HDF5 file") from None
    with f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a lensflow validation statistics file (schema {f.attrs.get('schema')!r})")
        out: dict[str, Any] = {g: {k: f[g][k][()] for k in f[g]} for g in f}
        out["attrs"] = {k: json.loads(v) for k, v in f.attrs.items() if k != "schema"}
    return out


def write_measured(
    folder: str | os.PathLike, m: Measured, bins: Mapping[str, np.ndarray], edges: Mapping[str, np.ndarray]
) -> Path:
    """``stats.h5`` of a validation into ``folder``."""
    mem = m.memorization
    done = mem.get("status") == "done"
    return write_stats(
        Path(folder) / STATS_FILE,
        m.stats["reference"],
        m.stats["candidate"],
        bins,
        edges,
        {"summary_config": m.config.to_dict(), "reference": m.inputs["reference"], "candidate": m.inputs["candidate"]},
        indices=m.indices,
        distances={k: mem[k] for k in _DISTANCES} if done else None,
    )


def summary_record(
    vc: ValidationRequest,
    m: Measured,
    bins: Mapping[str, np.ndarray],
    edges: Mapping[str, np.ndarray],
    figures: Mapping[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """The content of ``summary.json`` (plain JSON types; ``timings.total_s`` is left for the caller)."""
    result, mem = m.result, m.memorization
    verdicts = {name: r["verdict"]["pass"] for name, r in result["statistics"].items()}
    failures = list(result["failures"])
    if mem.get("status") == "done":
        verdicts["memorization"] = mem["pass"]
        failures += mem["failures"]
    # report-level gates beside the per-statistic verdicts: the omnibus test and the field-level KL gap
    gates: dict[str, bool] = {}
    if result.get("omnibus") is not None and result["omnibus"].get("alpha") is not None:
        gates["omnibus"] = bool(result["omnibus"]["pass"])
    if (result.get("joint_corr") or {}).get("pass") is not None:
        gates["joint_corr"] = bool(result["joint_corr"]["pass"])
    if m.field is not None and m.field.get("gating"):
        gates["field"] = bool(m.field["pass"])
        failures += m.field.get("failures", [])
    passed = all(verdicts.values()) and all(gates.values())
    summary = {
        "schema": SCHEMA,
        "pass": passed,
        "exit_code": 0 if passed else 1,
        "verdicts": verdicts,
        "gates": gates,
        "failures": failures,
        "warnings": warnings,
        "low_power": [w for w in warnings if w.startswith("low power")],
        "calibration": result.get("calibration"),
        "omnibus": result.get("omnibus"),
        "joint_corr": result.get("joint_corr"),
        "field": m.field,
        "table": summary_rows(result),
        "statistics": result["statistics"],
        "memorization": {k: v for k, v in mem.items() if k not in _DISTANCES},
        "tolerances": result["tolerances"],
        "summary_config": m.config.to_dict(),
        "bins": bins,
        "kappa_edges": edges,
        "inputs": m.inputs,
        "config": vc.plain,
        "figures": figures,
        "files": {"summary": SUMMARY_FILE, "stats": STATS_FILE, "report": REPORT_FILE},
        "provenance": provenance(vc.plain),
        "lensflow_version": lensflow.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings": {"statistics_s": m.seconds, "total_s": None},
    }
    return to_plain(summary, nan_to_none=True)


def write_summary(folder: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (strict JSON: non-finite numbers are ``null``) atomically."""
    return write_json(Path(folder) / SUMMARY_FILE, to_plain(summary, nan_to_none=True))


def load_report(folder: str | os.PathLike) -> dict[str, Any]:
    """``summary.json`` and ``stats.h5`` of a validation folder, for notebooks: ``{"summary", "stats", "dir"}``."""
    folder = Path(folder)
    sj = folder / SUMMARY_FILE
    if not sj.is_file():
        raise ValueError(f"{folder}: no {SUMMARY_FILE} (not a lensflow validation folder)")
    with open(sj) as fh:
        summary = json.load(fh)
    return {"summary": summary, "stats": read_stats(folder / STATS_FILE), "dir": folder}
