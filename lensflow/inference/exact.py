"""The exact likelihood in the emulator's shape, so inference can be run (and tested) with the truth itself.

:class:`ExactModel` answers ``log_prob(maps, cond)`` like :class:`lensflow.emulator.Emulator`, from the
simulator at each condition row, so :func:`lensflow.inference.likelihoods.emulator_loglike` and the grid
posteriors run unchanged on the exact ``p(κ | θ)``: the reference every emulator posterior is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lensflow.sims.flat import FlatSimulator

__all__ = ["ExactModel"]


class ExactModel:
    """``log_prob(maps, cond)`` from ``simulator_at(θ)`` (e.g. :meth:`lensflow.sims.truth.StoreTruth.simulator`).

    Args:
        simulator_at: the simulator at one parameter vector θ [P] (physical values, ``param_names`` order).
        param_names: the parameters.
    """

    def __init__(self, simulator_at: Callable[[np.ndarray], FlatSimulator], param_names: Sequence[str]) -> None:
        self.simulator_at = simulator_at
        self.param_names = tuple(param_names)

    def log_prob(self, maps: Any, cond: Any = None, batch_size: int | None = None) -> np.ndarray:
        """Exact ``log p(κ_i | θ_i)`` [n] nats; ``cond`` [n, P] or [P] (rows sharing θ share one factorization)."""
        x = np.asarray(maps)
        rows = np.broadcast_to(np.asarray(cond, dtype=np.float64), (x.shape[0], len(self.param_names)))
        out = np.empty(x.shape[0])
        nodes, inverse = np.unique(rows, axis=0, return_inverse=True)
        for k, theta in enumerate(nodes):
            sel = np.flatnonzero(inverse.reshape(-1) == k)
            out[sel] = self.simulator_at(theta).log_prob(x[sel])
        return out
