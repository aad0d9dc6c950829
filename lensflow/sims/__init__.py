"""Simulated convergence maps: theory spectra, flat-sky Gaussian/lognormal fields, full-sky GLASS maps.

* :func:`lensflow.sims.theory.convergence_cl` -- C_ℓ^κκ from pyccl (halofit) for source planes / n(z) bins;
* :func:`lensflow.sims.flat.simulate_maps` / :class:`~lensflow.sims.flat.FlatSimulator` -- flat-sky maps;
* :class:`lensflow.sims.fullsky.FullSkySimulator` -- GLASS lognormal shells + multi-plane Born on HEALPix;
* :func:`lensflow.sims.patches.cut_patches` -- non-overlapping gnomonic patches from any HEALPix map.

Heavy dependencies (pyccl, healpy, glass) are imported only when used.
"""

from lensflow.sims.flat import FlatSimulator, simulate_maps
from lensflow.sims.fullsky import FullSkySimulator
from lensflow.sims.patches import Patches, cut_patches, patch_centers
from lensflow.sims.theory import PLANCK18, convergence_cl, hilbert2011_shift

__all__ = [
    "PLANCK18",
    "FlatSimulator",
    "FullSkySimulator",
    "Patches",
    "convergence_cl",
    "cut_patches",
    "hilbert2011_shift",
    "patch_centers",
    "simulate_maps",
]
