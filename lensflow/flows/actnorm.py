"""Activation normalisation with data-dependent initialisation (Kingma & Dhariwal 2018, sec. 3.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._common import DataInitialized, acc_dtype, check_positive_int


class ActNorm(DataInitialized):
    """Per-channel affine map ``y = (x + bias) * exp(logs)``, initialised so ``y`` has zero mean, unit variance.

    The first ``forward`` call (in any mode) sets ``bias``/``logs`` from that batch, with the per-channel
    sums and sums of squares all-reduced over processes when ``torch.distributed`` is initialised, so every
    rank gets the statistics of the union of the ranks' batches (every rank must therefore make that first
    call). The ``initialized`` flag is a persistent buffer: a model restored with ``load_state_dict`` is
    never re-initialised. ``inverse`` never initialises.

    Parameters are float32 (or whatever the module is cast to); inputs of lower precision (inside
    autocast regions of a coupling network) are handled in their own dtype, while the log-det is
    always accumulated in float32/float64.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        self.channels = channels
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``bias = -mean`` and ``logs = -log(std + eps)`` per channel from the batch ``x`` [B, C, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        x64 = x.detach().to(torch.float64)
        dims = (0, 2, 3)
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], dtype=torch.float64, device=x.device)
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        c = self.channels
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        self.bias.copy_((-mean).to(self.bias.dtype))
        self.logs.copy_((-torch.log(var.sqrt() + self.eps)).to(self.logs.dtype))
        self._mark_initialized()

    def _logdet(self, x: Tensor) -> Tensor:
        ld = self.logs.to(acc_dtype(x)).sum() * (x.shape[2] * x.shape[3])
        return ld.expand(x.shape[0])

    def normalize(self, x: Tensor) -> Tensor:
        """``forward`` without the log-det (for hidden activations inside coupling networks)."""
        if not self.is_initialized:
            self.initialize(x)
        b = self.bias.to(x.dtype).view(1, -1, 1, 1)
        s = self.logs.to(x.dtype).exp().view(1, -1, 1, 1)
        return (x + b) * s

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent direction. Returns ``(y, logdet[B])``."""
        return self.normalize(x), self._logdet(x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        b = self.bias.to(y.dtype).view(1, -1, 1, 1)
        s = (-self.logs.to(y.dtype)).exp().view(1, -1, 1, 1)
        return y * s - b

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
