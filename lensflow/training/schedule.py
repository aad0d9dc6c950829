"""Schedules of a training run: the learning-rate multiplier and the EMA update of the weights."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["WarmupCosine", "ema_decay", "ema_update_"]


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``.

    A plain callable object (not a closure) so LambdaLR's state_dict stays plain data.
    """

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def ema_decay(decay: float, t: int) -> float:
    """The EMA decay at update ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))``, so early weights fade fast."""
    return min(decay, (1.0 + t) / (10.0 + t))


@torch.no_grad()
def ema_update_(ema: Iterable[torch.Tensor], raw: Iterable[torch.Tensor], decay: float) -> None:
    """``ema := decay * ema + (1 - decay) * raw``, in place, for every pair of tensors."""
    torch._foreach_lerp_(list(ema), [p.detach() for p in raw], 1.0 - decay)
