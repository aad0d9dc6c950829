"""Training a Glow emulator of κ maps: data, the Lightning module, the sample check, callbacks, ``train``.

``data`` (the DataModule; ``augment`` and ``order`` its augmentation and data order), ``glow_module``
(:class:`GlowModule`: the loop, schedule, EMA and non-finite guard around a :class:`lensflow.model.KappaFlow`),
``settings`` (typed model/optimiser/check settings), ``sample_check`` (the sample check, validate's code on arrays,
and its callback), ``callbacks``, ``loggers``, ``request`` (the config as typed objects) and ``run``
(:func:`train`). ``python -m lensflow.train`` is :func:`train` behind :mod:`lensflow.cli`.
"""

from lensflow.checkpoint import NonFiniteCheckpointError
from lensflow.report.text import train_summary_text
from lensflow.training.data import EpochSampler, KappaDataModule
from lensflow.training.glow_module import GlowModule, TrainingDivergedError
from lensflow.training.request import TrainRequest, resolve_store
from lensflow.training.run import train
from lensflow.training.sample_check import SampleCheck, sample_check
from lensflow.training.settings import CheckSettings, ModelSettings, OptimSettings

__all__ = [
    "CheckSettings",
    "EpochSampler",
    "GlowModule",
    "KappaDataModule",
    "ModelSettings",
    "NonFiniteCheckpointError",
    "OptimSettings",
    "SampleCheck",
    "TrainRequest",
    "TrainingDivergedError",
    "resolve_store",
    "sample_check",
    "train",
    "train_summary_text",
]
