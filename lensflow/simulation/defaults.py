"""The defaults of a simulation spec and of ``python -m lensflow.simulate``: the one copy of each.

A composed config of ``python -m lensflow.simulate`` (or ``data.simulate`` of ``train``) is complete and used as
it is; a partial mapping (``{"n_maps": 4, "sim": {"cosmology": {"m_nu": 0}}}``) is completed from these tables. The
command line reads the same tables: ``conf/sim_spec/default.yaml``, ``conf/sim/*.yaml``, ``conf/simulate.yaml`` and
``conf/split_fractions/default.yaml`` take them as nodes (:mod:`lensflow.confstore`), so a partial spec and its
composed twin have one hash.
"""

from __future__ import annotations

import copy
from typing import Any

from lensflow.mapstore import DEFAULT_FRACTIONS
from lensflow.sims.theory import PLANCK18

__all__ = ["DEFAULT_SIM", "RUN_DEFAULTS", "SIM_PRESETS", "SPEC_DEFAULTS", "SPLIT_DEFAULTS", "spec_defaults"]

#: The ``sim`` preset of a spec that names none (``conf/sim_spec/default.yaml``'s defaults list).
DEFAULT_SIM = "lognormal_flat"

#: The ``sim`` nodes by preset name (``sim=<name>``, ``conf/sim/<name>.yaml``), each without its ``cosmology``
#: (:data:`lensflow.sims.theory.PLANCK18`; override a parameter as ``sim.cosmology.NAME=value``).
SIM_PRESETS: dict[str, dict[str, Any]] = {
    # Flat-sky Gaussian κ maps with the halofit C_ell of the cosmology (lensflow.sims.flat).
    "gaussian_flat": {
        "backend": "flat",
        "kind": "gaussian",  # gaussian | lognormal
        # Source bins, one map channel each: redshifts of source planes, or {z: [...], nz: [...]} n(z) bins.
        "z_source": [1.0],
        "shift": None,  # unused by Gaussian maps
        "periodic": False,  # true: periodic tiles; false: crops of a pad-times larger periodic field
        "pad": 2,  # periodic grid side / npix for non-periodic maps (>= 2)
        "nonlinear": True,  # halofit (true) or linear matter power
    },
    # Flat-sky shifted-lognormal κ maps with the halofit C_ell of the cosmology (lensflow.sims.flat).
    "lognormal_flat": {
        "backend": "flat",
        "kind": "lognormal",  # gaussian | lognormal
        # Source bins, one map channel each: redshifts of source planes, or {z: [...], nz: [...]} n(z) bins.
        "z_source": [1.0],
        "shift": None,  # lognormal shift lambda (kappa >= -lambda) per channel; null = Hilbert et al. 2011 fit
        "periodic": False,  # true: periodic tiles; false: crops of a pad-times larger periodic field
        "pad": 2,  # periodic grid side / npix for non-periodic maps (>= 2)
        "nonlinear": True,  # halofit (true) or linear matter power
    },
    # Full-sky κ maps from GLASS lognormal matter shells and multi-plane Born lensing on HEALPix, cut into
    # non-overlapping gnomonic patches (lensflow.sims.fullsky); see conf/sim/lognormal_fullsky.yaml.
    "lognormal_fullsky": {
        "backend": "fullsky",
        "kind": "lognormal",  # lognormal | gaussian matter shells
        "z_source": [1.0],  # source planes (each a shell edge) or {z: [...], nz: [...]} n(z) bins
        "shift": None,  # lognormal shift of the matter shells (delta >= -shift); null = 1
        "periodic": False,  # must be false: patches are not periodic
        "nonlinear": True,  # halofit (true) or linear matter power
        "nside": 2048,  # HEALPix resolution (1.7' pixels)
        "lmax": None,  # band limit of the shells; null = 3 nside - 1
        "shell_dx": 150.0,  # largest shell thickness, comoving Mpc
        "ncorr": 3,  # correlated neighbouring shells (only with non-Limber shell spectra)
        "l_limber": -1,  # pyccl non-Limber (FKEM) shell spectra below this ell; -1 = Limber everywhere
        "pixwin": False,  # apply the HEALPix pixel window (needs healpy's pixel-window data files)
        "interpolation": "bilinear",  # patch pixels from the HEALPix map: bilinear | nearest
    },
    # Flat-sky κ maps ray-traced (Born) through particle-mesh N-body light cones (lensflow.sims.nbody); see
    # conf/sim/nbody_flat.yaml.
    "nbody_flat": {
        "backend": "nbody",
        "kind": "nbody",
        "z_source": [1.0],  # source planes or {z: [...], nz: [...]} n(z) bins, one channel each
        "periodic": False,  # must be false: light-cone maps are not periodic
        # Mpc/h; must hold the field of view at the farthest lens plane (3.5 deg at z = 1: 141 Mpc/h)
        "box_size": 160.0,
        "n_particles": 128,  # per side (128^3 particles: 1.25 Mpc/h apart)
        "mesh_factor": 2,  # force-mesh cells per particle per side (FastPM's B)
        "n_steps": 10,  # kick-drift-kick steps from z_init to today (growth-corrected: linear growth is exact)
        "z_init": 9.0,  # redshift of the 2LPT initial conditions; the light cone ends there
        "n_cuts": 2,  # slabs per box side: lens planes box_size / n_cuts = 80 Mpc/h thick
        "plane_mesh": None,  # lens-plane cells per side; null = the force mesh (256: 0.63 Mpc/h)
        "n_boxes": 16,  # independent PM runs the n_maps maps are cut from
        "device": "cpu",  # torch device of the PM runs (cuda: same statistics, other bits, so another cache file)
    },
}

#: The train/val/test split by realization (``conf/split_fractions/default.yaml``): a full-sky map's patches, or an
#: N-body box's maps, share one, and a seeded hash assigns it (:func:`lensflow.mapstore.assign_splits`).
SPLIT_DEFAULTS: dict[str, Any] = {
    "fractions": list(DEFAULT_FRACTIONS),  # train, val, test
    "seed": 0,  # seeds the hash of the realization ids
}

#: The spec keys besides ``sim`` (``conf/sim_spec/default.yaml``), in the order Hydra composes them.
SPEC_DEFAULTS: dict[str, Any] = {
    "split": SPLIT_DEFAULTS,
    "n_maps": 1000,  # maps (per cosmology in grid mode)
    "npix": 128,  # map side in pixels
    # pixel side in arcmin (128 x 1.64' = 3.5 deg, a MassiveNuS field at a quarter of its resolution)
    "pixel_arcmin": 1.64,
    "seed": 0,  # map i of cosmology k depends only on (seed, k, i)
    # Cosmology grid for conditional training: null, or {parameter: [values]} over keys of sim.cosmology, e.g.
    # {Omega_m: [0.25, 0.3, 0.35], sigma_8: [0.75, 0.8, 0.85]}; /params stores the values per map.
    "grid": None,
    "grid_mode": "product",  # product: every combination of the lists | zip: the i-th values together (equal lengths)
}

#: The run-time keys of ``conf/simulate.yaml`` but ``out`` (which a Python caller must name): how the store is
#: written, never what it holds.
RUN_DEFAULTS: dict[str, Any] = {
    "overwrite": False,  # replace an existing store
    "batch_size": 256,  # maps per write (memory); never changes a map
    "compression": None,  # null | gzip | lzf
    "progress": True,  # tqdm progress bar on stderr
}


def spec_defaults(sim: str | None = None) -> dict[str, Any]:
    """A fresh, complete default spec with the ``sim`` preset ``sim`` (default :data:`DEFAULT_SIM`)."""
    name = DEFAULT_SIM if sim is None else sim
    if name not in SIM_PRESETS:
        raise ValueError(f"sim: unknown simulation config {name!r}; available: {sorted(SIM_PRESETS)}")
    node = {"cosmology": dict(PLANCK18), **SIM_PRESETS[name]}
    return copy.deepcopy({"sim": node, **SPEC_DEFAULTS})
