"""lensflow: Glow normalizing-flow emulators of weak-lensing convergence (κ) maps.

Data flows one way: simulate or ingest -> map store (HDF5) -> DataModule -> Glow
LightningModule -> checkpoint -> generate -> map store -> statistics -> validation report.
The ground floor (``sims``, ``mapstore``, ``flows``, ``stats``) imports neither Hydra nor Lightning.

From a notebook, ``lensflow.load(path)`` gives the trained emulator (:class:`lensflow.emulator.Emulator`:
``sample``, ``log_prob``, ``meta``, ``param_names``; the model itself is :class:`lensflow.model.KappaFlow`, a plain
``torch.nn.Module``); importing ``lensflow`` itself loads nothing heavy. ``python -m lensflow`` lists the commands.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "load"]


def load(path: str | os.PathLike, device: Any = "auto") -> Any:
    """The trained emulator of a checkpoint (:class:`lensflow.emulator.Emulator`) on ``device`` (``auto``:
    CUDA when available); torch and Lightning are imported here, not by ``import lensflow``."""
    from lensflow.emulator import Emulator

    return Emulator.load(path, device)
