"""One Glow step of flow: ActNorm -> invertible 1x1 convolution -> affine coupling."""

from __future__ import annotations

from torch import Tensor, nn

from .actnorm import ActNorm
from .coupling import AffineCoupling
from .invconv import InvConv1x1


class FlowStep(nn.Module):
    """``ActNorm -> InvConv1x1 -> AffineCoupling`` in the data -> latent direction (openai/glow order)."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        cond_dim: int = 0,
        padding: str = "zero",
        scale_bound: float = 2.0,
    ) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden, cond_dim, padding, scale_bound)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ld = self.actnorm(x)
        x, ld1 = self.invconv(x)
        x, ld2 = self.coupling(x, cond)
        return x, ld + ld1 + ld2

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        y = self.coupling.inverse(y, cond)
        y = self.invconv.inverse(y)
        return self.actnorm.inverse(y)
