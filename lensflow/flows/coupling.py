"""Affine coupling layer with a bounded (soft-clamped) scale (Dinh et al. 2017; Kingma & Dhariwal 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import acc_dtype, check_cond, check_positive_int, stream_dtype
from .nets import CouplingNet

_LOGSIG2 = -math.log1p(math.exp(-2.0))  # log sigmoid(2)


class AffineCoupling(nn.Module):
    """Split channels into ``(x_a, x_b)``; ``y_b = (x_b + t(x_a, cond)) * exp(s(x_a, cond))``, ``y_a = x_a``.

    ``x_a`` is the first ``channels - channels // 2`` channels. The log-scale is openai/glow's
    ``log sigmoid(raw + 2)``, re-centred so the layer starts as the exact identity and soft-clamped below:
    ``s = scale_bound * tanh((log sigmoid(raw + 2) - log sigmoid(2)) / scale_bound)``, i.e.
    ``s`` in ``(-scale_bound, 0.127)``. In the data -> latent (training) direction a coupling can thus
    expand by at most 13%: the first optimiser steps, which push every log-scale up at once, cannot make
    the activations of a deep flow explode. In the latent -> data direction a coupling expands by at most
    ``exp(scale_bound)``, so sampling cannot overflow either. The network's last convolution is
    zero-initialised; the network may run in bf16 under autocast while shift, scale and log-det are
    float32/float64.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        cond_dim: int = 0,
        padding: str = "zero",
        scale_bound: float = 2.0,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels, minimum=2)
        if not scale_bound > 0:
            raise ValueError(f"scale_bound must be > 0, got {scale_bound!r}")
        self.channels = channels
        self.cond_dim = cond_dim
        self.n_keep = channels - channels // 2
        self.n_change = channels // 2
        self.scale_bound = float(scale_bound)
        self.net = CouplingNet(self.n_keep, 2 * self.n_change, hidden, cond_dim, padding)

    def _shift_logscale(self, xa: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        cond = check_cond(cond, self.cond_dim, xa.shape[0], "AffineCoupling")
        h = self.net(xa, cond).to(stream_dtype(xa))
        shift, raw = h[:, : self.n_change], h[:, self.n_change :]
        b = self.scale_bound
        log_s = F.logsigmoid(raw + 2.0) - _LOGSIG2
        return shift, b * torch.tanh(log_s / b)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent direction. Returns ``(y, logdet[B])``."""
        xa, xb = x[:, : self.n_keep], x[:, self.n_keep :]
        shift, log_s = self._shift_logscale(xa, cond)
        yb = (xb + shift) * log_s.exp()
        logdet = log_s.to(acc_dtype(x)).sum(dim=(1, 2, 3))
        return torch.cat([xa, yb.to(x.dtype)], dim=1), logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        ya, yb = y[:, : self.n_keep], y[:, self.n_keep :]
        shift, log_s = self._shift_logscale(ya, cond)
        xb = yb * (-log_s).exp() - shift
        return torch.cat([ya, xb.to(y.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale_bound={self.scale_bound}"
