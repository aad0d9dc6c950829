"""Augmentation of training maps: the 8 symmetries of the square and cyclic shifts, per map.

Draws come from a CPU ``torch.Generator`` the caller seeds (the DataModule seeds one per batch from
``(seed, rank, batch counter)``), so an augmented batch is a function of those integers only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dihedral_transform", "random_augment", "roll_each"]


def dihedral_transform(x: Tensor, code: Tensor) -> Tensor:
    """Apply one of the 8 symmetries of the square to each map of ``x`` [B, C, H, W].

    ``code`` [B] holds integers 0..7: bit 0 = transpose (H<->W), bit 1 = flip rows, bit 2 = flip columns.
    Transpose-then-flips covers every element of the dihedral group D4 exactly once.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be square maps [B, C, H, W], got {tuple(x.shape)}")
    code = code.to(x.device).view(-1, 1, 1, 1)
    x = torch.where(code & 1 == 1, x.transpose(-1, -2), x)
    x = torch.where(code & 2 == 2, x.flip(-2), x)
    return torch.where(code & 4 == 4, x.flip(-1), x)


def roll_each(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Cyclic shift of map b by (dy[b], dx[b]) pixels (like ``torch.roll`` per map)."""
    B, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device).view(1, H) - dy.view(B, 1)) % H
    cols = (torch.arange(W, device=x.device).view(1, W) - dx.view(B, 1)) % W
    x = x.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W))
    return x.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


def random_augment(x: Tensor, generator: torch.Generator, translate: bool) -> Tensor:
    """Random dihedral symmetry (and cyclic shift if ``translate``) per map; draws on a CPU generator."""
    B, H = x.shape[0], x.shape[-1]
    code = torch.randint(0, 8, (B,), generator=generator)
    out = dihedral_transform(x, code)
    if translate:
        shifts = torch.randint(0, H, (2, B), generator=generator).to(x.device)
        out = roll_each(out, shifts[0], shifts[1])
    return out
