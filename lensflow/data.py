"""Old import path of the training DataModule (kept for one release): see :mod:`lensflow.training.data`."""

from __future__ import annotations

from lensflow.training.augment import dihedral_transform, random_augment, roll_each
from lensflow.training.data import KappaDataModule
from lensflow.training.sampler import EpochSampler

_roll_each = roll_each  # the old private name, used by callers of lensflow 0.1

__all__ = ["EpochSampler", "KappaDataModule", "dihedral_transform", "random_augment"]
