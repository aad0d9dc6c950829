"""The ingest job of ``python -m lensflow.ingest``: external κ maps into a map store.

Modules: :mod:`~lensflow.ingestion.files` (find, inspect and read the input files),
:mod:`~lensflow.ingestion.request` (the typed request and its defaults) and :mod:`~lensflow.ingestion.job`
(check the inputs against each other, write the store).
"""

from __future__ import annotations

from lensflow.ingestion.files import FITS_SUFFIXES, NPY_SUFFIXES, IngestError, expand_inputs
from lensflow.ingestion.job import ingest
from lensflow.ingestion.request import FORMATS, IngestRequest

__all__ = ["FITS_SUFFIXES", "FORMATS", "NPY_SUFFIXES", "IngestError", "IngestRequest", "expand_inputs", "ingest"]
