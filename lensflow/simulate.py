"""``python -m lensflow.simulate``: simulate κ maps into a map store.

Examples::

    python -m lensflow.simulate sim=lognormal_flat n_maps=2000 npix=128 pixel_arcmin=1.64 seed=0 out=data/kappa.h5
    python -m lensflow.simulate sim=gaussian_flat out=data/gauss.h5
    python -m lensflow.simulate 'grid={Omega_m:[0.25,0.3,0.35],sigma_8:[0.75,0.8,0.85]}' n_maps=500 out=data/grid.h5
    python -m lensflow.simulate sim=lognormal_fullsky sim.nside=1024 n_maps=3000 out=data/fullsky.h5
    python -m lensflow.simulate 'sim.z_source=[0.5,1.0,1.5]' out=data/tomo.h5   # three tomographic channels

Config: ``conf/simulate.yaml``; its simulation spec is ``conf/sim_spec/default.yaml`` with the group ``conf/sim/``
(backend, kind, cosmology, sources). In grid mode ``n_maps`` is per cosmology and ``/params`` holds the grid values
under their names. A map depends only on the seed, its cosmology's index in the grid and its own index, not on
``batch_size``. Exit status 0 on success, 2 with one ``error: ...`` line on stderr for bad input.

The job is :func:`lensflow.simulation.simulate`; a partial mapping from Python
(``{"n_maps": 4, "sim": {"cosmology": {"m_nu": 0}}}``) is completed from :mod:`lensflow.simulation.defaults`.
"""

from __future__ import annotations

from lensflow import cli
from lensflow.simulation import simulate

main = cli.command("simulate", simulate, render=str)  # prints the store path

if __name__ == "__main__":
    main()
