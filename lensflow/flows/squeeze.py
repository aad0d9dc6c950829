"""Space-to-channel squeeze (Dinh et al. 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import acc_dtype


class Squeeze(nn.Module):
    """``[B, C, H, W] -> [B, 4C, H/2, W/2]``: each 2x2 block of pixels becomes 4 channels.

    Output channel ``4 c + 2 dy + dx`` holds input channel ``c`` at pixel offset ``(dy, dx)`` of the block.
    A permutation, so the log-det is zero.
    """

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"x: Squeeze needs even height and width, got {h}x{w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b, dtype=acc_dtype(x))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        b, c4, h, w = y.shape
        if c4 % 4:
            raise ValueError(f"y: Squeeze.inverse needs a multiple of 4 channels, got {c4}")
        c = c4 // 4
        return y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
