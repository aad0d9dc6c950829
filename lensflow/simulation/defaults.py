"""The library's defaults of a simulation spec, for Python callers that give part of one.

A composed config of ``python -m lensflow.simulate`` (or ``data.simulate`` of ``train``) is complete and used as
it is; a partial mapping (``{"n_maps": 4, "sim": {"cosmology": {"m_nu": 0}}}``) is completed from these tables,
never from the YAML at run time. ``conf/sim_spec/default.yaml``, ``conf/sim/*.yaml`` and ``conf/simulate.yaml``
give the command line the same values (``tests/test_simulation.py`` keeps the two equal), so a partial spec and
its composed twin have one hash.
"""

from __future__ import annotations

import copy
from typing import Any

from lensflow.mapstore import DEFAULT_FRACTIONS
from lensflow.sims.theory import PLANCK18

__all__ = ["DEFAULT_SIM", "RUN_DEFAULTS", "SIM_PRESETS", "spec_defaults"]

#: The ``sim`` preset of a spec that names none (``conf/sim_spec/default.yaml``'s defaults list).
DEFAULT_SIM = "lognormal_flat"

_FLAT = {"z_source": [1.0], "shift": None, "periodic": False, "pad": 2, "nonlinear": True}
#: The ``sim`` nodes by preset name (``conf/sim/<name>.yaml``); the cosmology is :data:`PLANCK18`.
SIM_PRESETS: dict[str, dict[str, Any]] = {
    "gaussian_flat": {"backend": "flat", "kind": "gaussian", **_FLAT},
    "lognormal_flat": {"backend": "flat", "kind": "lognormal", **_FLAT},
    "lognormal_fullsky": {
        "backend": "fullsky", "kind": "lognormal", "z_source": [1.0], "shift": None, "periodic": False,
        "nonlinear": True, "nside": 2048, "lmax": None, "shell_dx": 150.0, "ncorr": 3, "l_limber": -1,
        "pixwin": False, "interpolation": "bilinear",
    },
    "nbody_flat": {
        "backend": "nbody", "kind": "nbody", "z_source": [1.0], "periodic": False, "box_size": 160.0,
        "n_particles": 128, "mesh_factor": 2, "n_steps": 10, "z_init": 9.0, "n_cuts": 2, "plane_mesh": None,
        "n_boxes": 16, "device": "cpu",
    },
}  # fmt: skip

#: The spec keys besides ``sim`` (``conf/sim_spec/default.yaml``), in the order Hydra composes them.
_SPEC = {
    "split": {"fractions": list(DEFAULT_FRACTIONS), "seed": 0},
    "n_maps": 1000,
    "npix": 128,
    "pixel_arcmin": 1.64,
    "seed": 0,
    "grid": None,
    "grid_mode": "product",
}

#: The run-time keys of ``conf/simulate.yaml`` but ``out`` (which a Python caller must name): how the store is
#: written, never what it holds.
RUN_DEFAULTS: dict[str, Any] = {
    "overwrite": False,
    "batch_size": 256,
    "compression": None,
    "progress": True,
}


def spec_defaults(sim: str | None = None) -> dict[str, Any]:
    """A fresh, complete default spec with the ``sim`` preset ``sim`` (default :data:`DEFAULT_SIM`)."""
    name = DEFAULT_SIM if sim is None else sim
    if name not in SIM_PRESETS:
        raise ValueError(f"sim: unknown simulation config {name!r}; available: {sorted(SIM_PRESETS)}")
    node = {"cosmology": dict(PLANCK18), **SIM_PRESETS[name]}
    return copy.deepcopy({"sim": node, **_SPEC})
