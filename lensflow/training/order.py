"""The training data order: a deterministic, resumable, rank-aware sampler (:class:`EpochSampler`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """Deterministic, resumable, rank-aware sampler (what ``DistributedSampler`` does, plus a resume offset).

    Epoch ``e`` uses ``numpy.random.default_rng([seed, e]).permutation(n)`` (or ``arange`` without
    shuffle), padded by wrapping to a multiple of ``num_replicas``; rank ``r`` takes positions
    ``r, r + R, ...``. Each pass (``iter``) is the next epoch, starting at ``start_epoch``, whose first
    ``skip`` maps are dropped (resume inside an epoch). ``set_epoch`` is accepted for Lightning but not
    trusted: after a resume from a checkpoint written by an early stop, Lightning's epoch index runs one
    ahead of the data it has consumed, while this sampler counts the passes it has served.
    """

    def __init__(
        self,
        n: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        start_epoch: int = 0,
        skip: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for num_replicas={num_replicas}")
        self.n = int(n)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.next_epoch = int(start_epoch)
        self.current_epoch = int(start_epoch)
        self.skip = int(skip)
        self.num_samples = math.ceil(self.n / self.num_replicas) if self.n else 0

    def set_epoch(self, epoch: int) -> None:
        """Accepted for Lightning and ignored (see the class docstring)."""

    def order(self, epoch: int) -> np.ndarray:
        """Map positions this rank visits in ``epoch`` (without the resume offset)."""
        if self.n == 0:
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        total = self.num_samples * self.num_replicas
        if total > self.n:
            perm = np.concatenate([perm, perm[: total - self.n]])
        return perm[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        self.current_epoch = self.next_epoch
        self.next_epoch += 1
        idx = self.order(self.current_epoch)
        if self.skip:
            idx, self.skip = idx[self.skip :], 0
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples
