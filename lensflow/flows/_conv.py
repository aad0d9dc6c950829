"""Convolution helpers of the coupling networks: 3x3/1x1 conv with zero or periodic padding, fused conv + ReLU.

Shared by :mod:`lensflow.flows.nets` (the architecture) and :mod:`lensflow.flows._fused_cpu` (its hand-written
CPU backward), so neither imports the other's internals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["circular_pad", "conv", "conv_relu", "padded"]


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: str) -> Tensor:
    """``conv2d(x, weight, bias)`` with 'same' output size: zero padding or periodic (``padding="circular"``)."""
    k = weight.shape[-1]
    if k == 1:
        return F.conv2d(x, weight, bias)
    if padding == "circular":
        return F.conv2d(circular_pad(x, k // 2), weight, bias)
    return F.conv2d(x, weight, bias, padding=k // 2)


def circular_pad(x: Tensor, p: int) -> Tensor:
    """Periodic padding that keeps channels_last (F.pad's circular mode returns NCHW, halving conv speed)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return padded(x.permute(0, 2, 3, 1), True, p).permute(0, 3, 1, 2)
    return F.pad(x, (p, p, p, p), mode="circular")


def padded(t: Tensor, circular: bool, p: int = 1) -> Tensor:
    """[B, H, W, ...] -> [B, H + 2p, W + 2p, ...], zeros or periodic wrap around."""
    if circular:
        t = torch.cat([t[:, -p:], t, t[:, :p]], 1)
        return torch.cat([t[:, :, -p:], t, t[:, :, :p]], 2)
    return F.pad(t, [0, 0] * (t.dim() - 3) + [p, p, p, p])


_ONEDNN_RELU = [True]  # cleared if this torch build lacks oneDNN's fused convolution + ReLU


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: str) -> Tensor:
    """``relu(conv(x))``; one oneDNN call with the ReLU fused (one pass less) where that is exact and allowed:
    CPU, float32, channels_last, no autocast, and no autograd recording (the fused op has no derivative)."""
    if (
        _ONEDNN_RELU[0]
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        p = weight.shape[-1] // 2
        if padding == "circular" and p:
            x, p = circular_pad(x, p), 0
        try:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [p, p], [1, 1], [1, 1], 1, "relu", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN_RELU[0] = False
    return F.relu(conv(x, weight, bias, padding), inplace=True)
