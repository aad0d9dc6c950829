"""One Glow step of flow: ActNorm -> invertible 1x1 convolution -> affine or spline coupling."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_coupling
from .actnorm import ActNorm
from .coupling import AffineCoupling
from .invconv import InvConv1x1
from .spline import SplineCoupling


class FlowStep(nn.Module):
    """``ActNorm -> InvConv1x1 -> coupling`` in the data -> latent direction (openai/glow order).

    ``coupling="affine"`` is :class:`~lensflow.flows.coupling.AffineCoupling` (with ``scale_bound``);
    ``"spline"`` is :class:`~lensflow.flows.spline.SplineCoupling` (with ``spline_bins`` and ``spline_tail_bound``).
    Either sits at ``self.coupling``, so the state-dict keys of affine steps are those of before the choice.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        cond_dim: int = 0,
        padding: str = "zero",
        scale_bound: float = 2.0,
        *,
        coupling: str = "affine",
        spline_bins: int = 8,
        spline_tail_bound: float = 5.0,
    ) -> None:
        super().__init__()
        check_coupling(coupling)
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling: AffineCoupling | SplineCoupling = (
            AffineCoupling(channels, hidden, cond_dim, padding, scale_bound)
            if coupling == "affine"
            else SplineCoupling(channels, hidden, cond_dim, padding, spline_bins, spline_tail_bound)
        )

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ld = self.actnorm(x)
        x, ld1 = self.invconv(x)
        x, ld2 = self.coupling(x, cond)
        return x, ld + ld1 + ld2

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        y = self.coupling.inverse(y, cond)
        y = self.invconv.inverse(y)
        return self.actnorm.inverse(y)
