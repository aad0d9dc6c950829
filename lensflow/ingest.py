"""``python -m lensflow.ingest``: external κ maps into a map store.

Inputs (``input``: a folder, a glob pattern, a file, or a list of them):

* **flat FITS maps** (``.fits``, ``.fit``, ``.fits.gz``, ...), one map [H, W], a channel cube [C, H, W] or
  a cube of maps [N, C, H, W] per file (:mod:`lensflow.fitsio`). Pixel scale from ``ANGLE`` (map side in
  degrees, the Columbia lensing / MassiveNuS convention) or the WCS ``CDELT1/2`` / ``CD`` matrix;
  ``pixel_arcmin`` fills in for headers without one. Cosmological parameters from header keys when
  present (``H0``, ``OMEGA_M``/``OM``, ``SIGMA_8``/``SI8``, ``M_NU``/``MNV``, ...) become ``/params``.
  Every map is its own realization.
* **HEALPix maps** (FITS binary tables with ``PIXTYPE = 'HEALPIX'`` read by healpy, or ``.npy``/``.npz``
  arrays of 12 nside² pixels), cut into non-overlapping ``healpix.npix`` x ``healpix.npix`` gnomonic
  patches of ``pixel_arcmin`` (:func:`lensflow.sims.patches.cut_patches`). The patches of one input map
  share a realization id, so they never straddle train/val/test. ``hp.UNSEEN`` pixels are a mask:
  patches touching it are dropped.
* **NumPy arrays** (``.npy``, or ``.npz`` with ``npy.key``): [H, W], [N, H, W] or [N, C, H, W] flat maps
  of ``pixel_arcmin``; an ``.npz`` may carry ``params`` [N, P] with ``param_names`` [P].

Everything is checked before the store is written (shapes, pixel scales, parameter names and source
redshifts must agree across files; no NaN values), and a bad file is named in a one-line error. The
store is written atomically, so an error leaves nothing at ``out``. Exit status 0 on success, 2 on bad
input.

The job is :func:`lensflow.ingestion.ingest`: the composed config becomes an
:class:`~lensflow.ingestion.IngestRequest` once, at entry; a partial mapping from Python is completed from
:data:`lensflow.ingestion.request.DEFAULTS`.
"""

from __future__ import annotations

from lensflow import cli
from lensflow.ingestion import ingest

main = cli.command("ingest", ingest, render=str)  # prints the store path

if __name__ == "__main__":
    main()
