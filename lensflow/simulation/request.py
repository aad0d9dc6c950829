"""What ``python -m lensflow.simulate`` is asked to do: the resolved spec and where and how to write it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensflow._util.checks import check_bool, check_int
from lensflow._util.plain import to_plain
from lensflow.simulation.defaults import RUN_DEFAULTS
from lensflow.simulation.spec import RUN_KEYS, SPEC_KEYS, resolve_spec

__all__ = ["SimulationRequest"]


@dataclass(frozen=True)
class SimulationRequest:
    """One call of :func:`lensflow.simulation.simulate`, typed once at entry: the resolved spec and run-time keys."""

    spec: dict[str, Any]  # resolved (resolve_spec)
    out: Path
    overwrite: bool
    batch_size: int
    compression: str | None
    progress: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SimulationRequest:
        """From ``conf/simulate.yaml`` composed, or an equivalent mapping (a resolved spec plus run-time keys
        :data:`RUN_KEYS`); the keys left out take their defaults."""
        full = to_plain(cfg)
        if not isinstance(full, dict):
            raise ValueError("simulate: config must be a mapping")
        spec = resolve_spec({k: v for k, v in full.items() if k in SPEC_KEYS or k in RUN_KEYS})
        run = {**RUN_DEFAULTS, **{k: full[k] for k in RUN_KEYS if k in full}}
        if not run.get("out"):
            raise ValueError("out: give the path of the map store to write")
        out = Path(str(run["out"]))
        overwrite = check_bool("overwrite", run["overwrite"])
        if out.exists() and not overwrite:
            raise ValueError(f"out: {out} exists; pass overwrite=true to replace it")
        batch = check_int("batch_size", run["batch_size"] or RUN_DEFAULTS["batch_size"])
        return cls(spec, out, overwrite, batch, run["compression"], bool(run["progress"]))
