"""The simulation job of ``python -m lensflow.simulate``: κ maps simulated into a map store.

Modules: :mod:`~lensflow.simulation.spec` (the keys that fix the maps, resolved, validated and hashed),
:mod:`~lensflow.simulation.defaults` (the library's defaults of a partial spec),
:mod:`~lensflow.simulation.request` (the typed request), :mod:`~lensflow.simulation.job` (the writer loop) and
:mod:`~lensflow.simulation.cache` (``sim-<hash>.h5``, simulated once per spec).
"""

from __future__ import annotations

from lensflow.simulation.cache import ensure_simulated
from lensflow.simulation.job import box_splits, simulate
from lensflow.simulation.request import SimulationRequest
from lensflow.simulation.spec import SPEC_KEYS, resolve_spec, spec_hash

__all__ = ["SPEC_KEYS", "SimulationRequest", "box_splits", "ensure_simulated", "resolve_spec", "simulate", "spec_hash"]
