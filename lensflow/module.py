"""Old import path of the Lightning module (kept for one release): see :mod:`lensflow.training.glow_module`,
:mod:`lensflow.checkpoint` and :mod:`lensflow.training.checks`."""

from __future__ import annotations

from lensflow.checkpoint import MODEL_KIND, NonFiniteCheckpointError, read_checkpoint
from lensflow.training.checks import sample_check
from lensflow.training.glow_module import GlowModule, TrainingDivergedError, load_glow_module
from lensflow.training.schedule import WarmupCosine

_WarmupCosine = WarmupCosine  # the old private name, used by callers of lensflow 0.1

__all__ = [
    "MODEL_KIND",
    "GlowModule",
    "NonFiniteCheckpointError",
    "TrainingDivergedError",
    "load_glow_module",
    "read_checkpoint",
    "sample_check",
]
