"""The simulation cache: one store ``sim-<hash>.h5`` per spec, simulated once (``train``'s ``data.simulate``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow._util.plain import to_plain
from lensflow.mapstore import MapStoreError, open_store
from lensflow.simulation.job import simulate
from lensflow.simulation.request import SimulationRequest
from lensflow.simulation.spec import resolve_spec, spec_hash_of

__all__ = ["CACHE_RUN_KEYS", "ensure_simulated"]

log = get_logger(__name__)

#: The run-time keys a cached spec may carry (how the store is written, never what it holds).
CACHE_RUN_KEYS: tuple[str, ...] = ("batch_size", "compression", "progress")


def ensure_simulated(spec: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The store ``cache_dir/sim-<hash>.h5`` for ``spec`` (the keys of ``conf/sim_spec/default.yaml``, optionally
    ``batch_size``/``progress``/``compression``), simulated (atomically, with a progress bar) only if it is not
    there yet. The spec is resolved once."""
    plain = to_plain(spec)
    resolved = resolve_spec(plain)
    path = Path(cache_dir) / f"sim-{spec_hash_of(resolved)}.h5"
    if path.exists():
        try:
            open_store(path).close()
            return path
        except MapStoreError:
            log.warning("warning: %s is not a valid map store; simulating it again", path)
            path.unlink()
    run = {k: plain[k] for k in CACHE_RUN_KEYS if k in plain}
    with target_lock(path, wait=True):  # another process simulating the same spec: wait for it, then use its store
        if path.exists():
            return path
        simulate(SimulationRequest.from_config({**resolved, **run, "out": str(path), "overwrite": False}))
    return path
