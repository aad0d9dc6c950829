"""Stage records of the end-to-end pipeline: the hash that says a stage is up to date, pending and
finished records, written atomically.

Each stage writes into ``<run-dir>/<stage>/`` and, when it succeeds, ``stage.json``: the hash of its
resolved config together with the fingerprints of its inputs, its outputs and the time taken. While it
runs, ``stage.pending.json`` says which config the unfinished work belongs to (so a killed training
run resumes only for the same config).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lensflow._util.atomic import write_json
from lensflow._util.plain import to_plain

__all__ = ["PENDING", "RECORD", "STAGES", "PipelineError", "Stage", "stage_hash", "write_records"]

STAGES: tuple[str, ...] = ("simulate", "train", "generate", "validate", "report")
RECORD = "stage.json"
PENDING = "stage.pending.json"


class PipelineError(ValueError):
    """Bad input or an inconsistent pipeline folder (one line)."""


def stage_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as JSON with sorted keys.

    The recipe of the records already written (``json.dumps`` with its default separators): changing it
    would make every existing pipeline folder re-run all its stages, training included.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Stage:
    """One stage folder: its record, the check whether it is up to date, and its atomic completion."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.dir = run_dir / name

    def record(self) -> dict[str, Any] | None:
        """The finished record, or ``None`` when the stage has not completed."""
        return _read(self.dir / RECORD)

    def pending(self) -> dict[str, Any] | None:
        """The record of an unfinished run (``hash``, ``started``), or ``None``."""
        return _read(self.dir / PENDING)

    def status(self, key: str, force: bool) -> tuple[bool, str]:
        """(run?, why) for a stage whose config and inputs hash to ``key``."""
        rec = self.record()
        if force:
            return True, "forced"
        if rec is None:
            return True, "not done"
        if rec.get("hash") != key:
            return True, "config or inputs changed"
        missing = [p for p in rec.get("outputs_exist", []) if not Path(p).exists()]
        if missing:
            return True, f"output missing ({missing[0]})"
        return False, "up to date"

    def begin(self, key: str) -> None:
        """Drop the finished record and note that a run for ``key`` has started."""
        (self.dir / RECORD).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_records(self.dir / PENDING, {"hash": key, "started": time.time()})

    def finish(
        self,
        key: str,
        config: Any,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        fingerprint: str,
        exist: Sequence[str | Path],
        seconds: float,
    ) -> dict[str, Any]:
        """Write the finished record (``exist``: outputs whose absence re-runs the stage) and return it."""
        import lensflow

        rec = {
            "stage": self.name,
            "hash": key,
            "fingerprint": fingerprint,
            "config": config,
            "inputs": dict(inputs),
            "outputs": dict(outputs),
            "outputs_exist": [str(p) for p in exist],
            "seconds": round(seconds, 2),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lensflow_version": lensflow.__version__,
        }
        write_records(self.dir / RECORD, rec)
        (self.dir / PENDING).unlink(missing_ok=True)
        return rec


def write_records(path: Path, obj: Any) -> Path:
    """``obj`` as JSON at ``path`` (atomically; non-JSON leaves as strings, non-finite numbers as null)."""
    return write_json(path, to_plain(obj, nan_to_none=True))
