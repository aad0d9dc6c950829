"""Particle-mesh N-body light cones and their κ maps (torch; numba kernels on CPU).

* :mod:`lensflow.sims.nbody.background` -- E(a), distances, D₁, D₂ and FastPM's growth-corrected kick/drift factors;
* :mod:`lensflow.sims.nbody.mesh` -- cloud-in-cell painting/readout and the force's Fourier kernels;
* :mod:`lensflow.sims.nbody.ic` -- Gaussian linear field from pyccl's P(k) and 2LPT displacements;
* :mod:`lensflow.sims.nbody.pm` -- PM forces and the kick-drift-kick loop;
* :mod:`lensflow.sims.nbody.lightcone` -- lens-plane geometry, slab projection and Born κ maps;
* :class:`lensflow.sims.nbody.NBodySimulator` -- boxes → planes → many randomized maps per box.
"""

from lensflow.sims.nbody.simulator import NBodySimulator

__all__ = ["NBodySimulator"]
