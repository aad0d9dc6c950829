"""Convolutional networks used inside coupling layers and learned priors (architecture only).

On CPU, training steps of wide networks go through the hand-written backward of
:mod:`lensflow.flows._fused_cpu`; the convolution helpers are in :mod:`lensflow.flows._conv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _fused_cpu
from ._common import check_padding, check_positive_int
from ._conv import conv, conv_relu

__all__ = ["CouplingNet", "ZeroConv2d"]


class ZeroConv2d(nn.Module):
    """3x3 convolution started at exactly zero, with a learned per-channel output gain ``exp(3 * logs)``.

    Used as the last layer of every coupling network and learned prior, so each starts as the identity
    (coupling) or a standard normal (prior); the gain lets the output grow quickly once training starts
    (openai/glow ``Conv2dZeros``). The gain is folded into the weight and bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, padding: str = "zero", logscale_factor: float = 3.0
    ) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = float(logscale_factor)

    def forward(self, x: Tensor) -> Tensor:
        g = (self.logs * self.logscale_factor).exp()
        return conv(x, self.weight * g.view(-1, 1, 1, 1), self.bias * g, self.padding)


class CouplingNet(nn.Module):
    """``conv3x3 -> [FiLM(cond)] -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d`` (biases, PyTorch default init).

    ``cond`` ([B, cond_dim]) enters through a FiLM layer (per-channel scale and shift of the first hidden
    layer), zero-initialised so the conditional model starts equal to the unconditional one.

    No ActNorm on the hidden layers (unlike openai/glow): data-initialised unit-variance hidden units make
    the first Adam steps of the zero-initialised output layer move every coupling coherently by
    ``lr * sum|h|`` (order 1 at width 256), a loss spike that costs hundreds of steps; the default init
    keeps the hidden units ~4x smaller and training smooth. Inputs are already ActNorm-ed flow activations.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, cond_dim: int = 0, padding: str = "zero"
    ) -> None:
        super().__init__()
        check_positive_int("hidden", hidden)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        self.padding = check_padding(padding)
        conv1 = nn.Conv2d(in_channels, hidden, 3)
        conv2 = nn.Conv2d(hidden, hidden, 1)
        self.weight1, self.bias1 = conv1.weight, conv1.bias
        self.weight2, self.bias2 = conv2.weight, conv2.bias
        self.out = ZeroConv2d(hidden, out_channels, padding)
        self.cond_dim = cond_dim
        if cond_dim:
            self.film = nn.Linear(cond_dim, 2 * hidden)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        # channels_last: oneDNN (CPU) and cuDNN (GPU, bf16) run the 3x3 convolutions with few input or
        # output channels 1.3-3x faster than in NCHW.
        x = x.contiguous(memory_format=torch.channels_last)
        gamma = beta = None
        if self.cond_dim:
            gamma, beta = self.film(cond).to(x.dtype).chunk(2, dim=1)
        if _fused_cpu.use_fused(x, self.weight1.shape[0]):
            g = (self.out.logs * self.out.logscale_factor).exp()
            w3, b3 = self.out.weight * g.view(-1, 1, 1, 1), self.out.bias * g
            return _fused_cpu.coupling_net(
                x, self.weight1, self.bias1, self.weight2, self.bias2, w3, b3, gamma, beta, self.padding
            )
        if self.cond_dim:
            h = conv(x, self.weight1, self.bias1, self.padding)
            h = F.relu(h * (1.0 + gamma.to(h.dtype)[:, :, None, None]) + beta.to(h.dtype)[:, :, None, None])
        else:
            h = conv_relu(x, self.weight1, self.bias1, self.padding)
        return self.out(conv_relu(h, self.weight2, self.bias2, self.padding))
