"""The exact likelihood behind a map store written by a built-in flat simulation (from its provenance).

``python -m lensflow.simulate sim=lognormal_flat ...`` (and the embedded training data) records the resolved
simulation spec in the store's ``extra["spec"]``; :class:`StoreTruth` rebuilds the very simulator from it, so
the exact ``log p(κ | θ)`` of every map in the store is known: at the map's own parameters (grid stores
record them per map in ``/params``) or at any other θ of the same parameters (field-level inference).
Stores from the full-sky simulator, ingested N-body suites or mocks have no such truth and give one clear
line saying so.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import check_cosmology

__all__ = ["StoreTruth", "flat_simulator"]

# Dense crop factorizations are C·npix² squared float64 matrices (128 MB at 64²): keep only a few.
_CACHE = 4


def flat_simulator(
    sim: Mapping[str, Any], cosmology: Mapping[str, Any], npix: int, pixel_arcmin: float
) -> FlatSimulator:
    """The :class:`FlatSimulator` a resolved ``sim`` node (``conf/sim/*_flat.yaml`` keys) describes at ``cosmology``."""
    return FlatSimulator(
        int(npix),
        float(pixel_arcmin),
        dict(cosmology),
        sim["z_source"],
        kind=sim["kind"],
        periodic=bool(sim.get("periodic", False)),
        shift=sim.get("shift"),
        pad=sim.get("pad", 2),
        nonlinear=bool(sim.get("nonlinear", True)),
    )


class StoreTruth:
    """Exact log-densities of the maps of one built-in flat simulation store.

    Args:
        meta: the store's :class:`~lensflow.mapstore.StoreMeta` (its ``extra`` holds the spec).
        where: how to name the store in messages (its path).
    """

    def __init__(self, meta: Any, where: str = "store") -> None:
        extra = dict(getattr(meta, "extra", {}) or {})
        spec = extra.get("spec")
        sim = spec.get("sim") if isinstance(spec, Mapping) else None
        if getattr(meta, "kind", None) != "simulation" or not isinstance(sim, Mapping) or sim.get("backend") != "flat":
            what = extra.get("backend") or getattr(meta, "kind", "unknown")
            raise ValueError(
                f"{where}: no exact likelihood: the store was not written by a built-in flat simulator "
                f"(lensflow.simulate sim=gaussian_flat|lognormal_flat); it is a {what} store"
            )
        self.where = where
        self.sim = dict(sim)
        self.npix = int(spec["npix"])
        self.pixel_arcmin = float(spec["pixel_arcmin"])
        self.cosmology = check_cosmology(sim["cosmology"])
        self.param_names = tuple(getattr(meta, "param_names", ()) or ())
        grid = extra.get("grid") or {}
        points = np.asarray(grid.get("points", []), dtype=np.float64)
        self.grid_points = points.reshape(-1, len(self.param_names)) if points.size else np.zeros((0, 0))
        self._cache: OrderedDict[tuple[float, ...], FlatSimulator] = OrderedDict()

    @property
    def kind(self) -> str:
        """``"gaussian"`` or ``"lognormal"``."""
        return str(self.sim["kind"])

    def cosmology_at(self, theta: Mapping[str, float] | Sequence[float] | None = None) -> dict[str, Any]:
        """The store's cosmology with the parameters ``theta`` (a dict, or values in ``param_names`` order) set."""
        cosmo = dict(self.cosmology)
        if theta is None:
            return cosmo
        if not isinstance(theta, Mapping):
            vals = [float(v) for v in np.asarray(theta, dtype=np.float64).reshape(-1)]
            if len(vals) != len(self.param_names):
                raise ValueError(f"theta: expected {len(self.param_names)} values {list(self.param_names)}, got {vals}")
            theta = dict(zip(self.param_names, vals, strict=True))
        unknown = sorted(set(theta) - set(cosmo))
        if unknown:
            raise ValueError(f"theta: {unknown} are not parameters of the simulation's cosmology {sorted(cosmo)}")
        cosmo.update({k: float(v) for k, v in theta.items()})
        return cosmo

    def simulator(self, theta: Mapping[str, float] | Sequence[float] | None = None) -> FlatSimulator:
        """The simulator at ``theta`` (the store's cosmology when ``None``); the last few are kept."""
        cosmo = self.cosmology_at(theta)
        key = tuple(float(cosmo[k]) for k in sorted(k for k in cosmo if k != "transfer_function"))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        sim = flat_simulator(self.sim, cosmo, self.npix, self.pixel_arcmin)
        self._cache[key] = sim
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return sim

    def log_prob(self, maps: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
        """Exact ``log p(κ | θ_i)`` [n] in nats per map; ``params`` [n, P] are each map's θ (the store's ``/params``).

        Maps that share parameters are scored together, so a grid store costs one factorization per node.
        """
        x = np.asarray(maps)
        n = x.shape[0] if x.ndim == 4 else 1
        if not self.param_names:
            return self.simulator().log_prob(x)
        if params is None:
            raise ValueError(f"{self.where}: the maps were simulated at per-map {list(self.param_names)}; pass params")
        p = np.asarray(params, dtype=np.float64).reshape(n, len(self.param_names))
        out = np.empty(n)
        nodes, inverse = np.unique(p, axis=0, return_inverse=True)
        for k, node in enumerate(nodes):
            if self.grid_points.size:  # /params are float32: score at the float64 node that was simulated
                near = np.abs(self.grid_points - node).max(axis=1)
                j = int(np.argmin(near))
                if near[j] <= 1e-6 * max(1.0, float(np.abs(node).max())):
                    node = self.grid_points[j]
            sel = np.flatnonzero(inverse.reshape(-1) == k)
            out[sel] = self.simulator(node).log_prob(x[sel])
        return out
