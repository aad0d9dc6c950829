"""Monotonic rational-quadratic spline coupling with identity (linear, unit-slope) tails (Durkan, Bekasov, Murray &
Papamakarios 2019, "Neural Spline Flows")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import acc_dtype, check_cond, check_positive_int, check_positive_number, no_autocast, stream_dtype
from .nets import CouplingNet

__all__ = ["MAX_BINS", "SplineCoupling", "rq_spline"]

MIN_BIN_WIDTH = 1e-3  # as a fraction of 2 * tail_bound
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
MAX_BINS = 256  # keeps bins * MIN_BIN_WIDTH (and MIN_BIN_HEIGHT) well below 1


class SplineCoupling(nn.Module):
    """Split channels into ``(x_a, x_b)``; ``y_b = g(x_b; θ(x_a, cond))``, ``y_a = x_a``, with ``g`` an element-wise
    monotonic rational-quadratic spline of ``bins`` bins on ``[-tail_bound, tail_bound]`` and the identity outside.

    ``x_a`` is the first ``channels - channels // 2`` channels, as in :class:`~lensflow.flows.coupling.AffineCoupling`.
    The network gives, per changed pixel, ``bins`` width and ``bins`` height logits (softmax, then a floor of
    ``1e-3`` of the interval so no bin collapses) and ``bins - 1`` interior knot derivatives
    ``d = 1 + elu(raw, alpha=1 - 1e-3)``, i.e. ``d > 1e-3`` and ``d = 1`` exactly at ``raw = 0``; the two boundary
    derivatives are 1, so the spline joins the identity tails with a continuous slope. Zero logits therefore give
    equal bins with unit slopes and derivatives: the identity (to float rounding), which is where the
    zero-initialised last convolution starts the layer. Unlike the affine coupling, a spline can bend the
    distribution of ``x_b`` (skewed or bimodal conditionals) in one layer. It is bounded by construction: it maps
    ``[-tail_bound, tail_bound]`` onto itself and is the identity outside, so large inputs (the tails of κ) pass
    through unchanged, and sampling cannot overflow.

    ``tail_bound`` is in the units of the layer's input, which an ActNorm has normalised to unit scale: the default
    5 leaves out ~6e-7 of standard-normal activations. The network may run in bf16 under autocast; the spline
    is evaluated in the stream dtype (float32, float64 for float64 inputs) and its log-det accumulated in float32
    (float64).
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        cond_dim: int = 0,
        padding: str = "zero",
        bins: int = 8,
        tail_bound: float = 5.0,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels, minimum=2)
        check_positive_int("bins", bins, minimum=2)
        if bins > MAX_BINS:
            raise ValueError(f"bins must be an integer in [2, {MAX_BINS}], got {bins!r}")
        check_positive_number("tail_bound", tail_bound)
        self.channels = channels
        self.cond_dim = cond_dim
        self.n_keep = channels - channels // 2
        self.n_change = channels // 2
        self.bins = bins
        self.tail_bound = float(tail_bound)
        self.net = CouplingNet(self.n_keep, self.n_change * (3 * bins - 1), hidden, cond_dim, padding)

    def _params(self, xa: Tensor, cond: Tensor | None) -> Tensor:
        """Raw spline parameters ``[B, H, W, n_change, 3 * bins - 1]`` (stream dtype): widths, heights, derivatives.

        Pixel-major, a view of the network's channels_last output: the parameter gradients then come back
        channels_last too, the layout the fused CPU backward of the network reads without a strided copy
        (in NCHW, gathering its 9 taps cost more than the rest of the layer)."""
        cond = check_cond(cond, self.cond_dim, xa.shape[0], "SplineCoupling")
        h = self.net(xa, cond).to(stream_dtype(xa))
        b, _, hh, ww = h.shape
        return h.permute(0, 2, 3, 1).reshape(b, hh, ww, self.n_change, 3 * self.bins - 1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent direction. Returns ``(y, logdet[B])``."""
        xa, xb = x[:, : self.n_keep], x[:, self.n_keep :]
        theta = self._params(xa, cond)
        with no_autocast(x):
            yb, lad = rq_spline(xb.permute(0, 2, 3, 1).to(theta.dtype), theta, self.tail_bound)
        logdet = lad.to(acc_dtype(x)).sum(dim=(1, 2, 3))
        return torch.cat([xa, yb.permute(0, 3, 1, 2).to(x.dtype)], dim=1), logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        ya, yb = y[:, : self.n_keep], y[:, self.n_keep :]
        theta = self._params(ya, cond)
        with no_autocast(y):
            xb, _ = rq_spline(yb.permute(0, 2, 3, 1).to(theta.dtype), theta, self.tail_bound, inverse=True)
        return torch.cat([ya, xb.permute(0, 3, 1, 2).to(y.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bins={self.bins}, tail_bound={self.tail_bound}"


def _interior_knots(logits: Tensor, bound: float, min_size: float) -> Tensor:
    """The ``K - 1`` interior knots ``[..., K - 1]`` in ``(-bound, bound)`` of ``K`` bins from ``K`` logits; every bin
    is at least ``min_size * 2 * bound`` wide. (The end knots are exactly ``±bound``, added where used.)"""
    k = logits.shape[-1]
    sizes = min_size + (1.0 - min_size * k) * torch.softmax(logits, dim=-1)
    return 2.0 * bound * torch.cumsum(sizes[..., :-1], dim=-1) - bound


def _edges(knots: Tensor, idx: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Left and right knot of bin ``idx`` ([..., 1] int64 in [0, K - 1]) from the interior ``knots`` [..., K - 1]."""
    last = knots.shape[-1]
    left = torch.gather(knots, -1, (idx - 1).clamp_min(0)).squeeze(-1)
    right = torch.gather(knots, -1, idx.clamp_max(last - 1)).squeeze(-1)
    i = idx.squeeze(-1)
    return torch.where(i == 0, -bound, left), torch.where(i == last, bound, right)


def rq_spline(v: Tensor, theta: Tensor, bound: float, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """The monotonic rational-quadratic spline of ``theta`` (``[*v.shape, 3K - 1]`` raw widths, heights, interior
    derivatives) at ``v``, identity outside ``[-bound, bound]``. Returns ``(g(v), log g'(v))`` or, with ``inverse``,
    ``(g^{-1}(v), -log g'(g^{-1}(v)))``, element-wise.

    Inside, bin ``k`` maps ``ξ = (x - x_k) / w_k ∈ [0, 1]`` to
    ``y_k + h_k (s ξ² + d_k ξ(1-ξ)) / (s + (d_k + d_{k+1} - 2s) ξ(1-ξ))`` with ``s = h_k / w_k`` (Durkan et al.
    2019, sec. 3.1); the inverse is the root in ``[0, 1]`` of the quadratic ``a ξ² + b ξ + c = 0`` (their app. A),
    taken as ``2c / (-b - sqrt(b² - 4ac))``: the textbook ``(-b + sqrt(...)) / 2a`` cancels catastrophically and
    divides by ``a ≈ 0`` near the identity (``a = 0`` exactly there). Outside values are clamped into the interval
    for the arithmetic (no inf/NaN in either branch, hence none in the gradients), then replaced by the identity.
    Only the bin's two knots and derivatives are gathered (no ``[..., K + 1]`` tensors are built): the per-pixel
    parameter tensors are the largest of the layer.
    """
    k = (theta.shape[-1] + 1) // 3
    xs = _interior_knots(theta[..., :k], bound, MIN_BIN_WIDTH)
    ys = _interior_knots(theta[..., k : 2 * k], bound, MIN_BIN_HEIGHT)

    inside = (v >= -bound) & (v <= bound)
    vc = v.clamp(-bound, bound)
    # bin index = number of interior knots <= v (comparisons rather than searchsorted: vmap-friendly, K is small)
    idx = (vc[..., None] >= (ys if inverse else xs)).sum(dim=-1, keepdim=True)
    x0, x1 = _edges(xs, idx, bound)
    y0, y1 = _edges(ys, idx, bound)
    w0, h0 = x1 - x0, y1 - y0
    # knot derivatives 1 + elu(raw) (exactly 1 at raw = 0, > MIN_DERIVATIVE), and 1 at ±bound to meet the tails
    d0, d1 = _edges(theta[..., 2 * k :], idx, 0.0)  # raw 0 at the ends: derivative 1
    d0 = 1.0 + F.elu(d0, alpha=1.0 - MIN_DERIVATIVE)
    d1 = 1.0 + F.elu(d1, alpha=1.0 - MIN_DERIVATIVE)
    s = h0 / w0
    curv = d0 + d1 - 2.0 * s
    if inverse:
        dy = vc - y0
        a = h0 * (s - d0) + dy * curv
        b = h0 * d0 - dy * curv
        c = -s * dy
        disc = (b * b - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c / (-b - disc.sqrt())).clamp(0.0, 1.0)
        out = x0 + xi * w0
    else:
        xi = ((vc - x0) / w0).clamp(0.0, 1.0)
    t = xi * (1.0 - xi)
    den = s + curv * t
    if not inverse:
        out = y0 + h0 * (s * xi * xi + d0 * t) / den
    lad = torch.log(s * s * (d1 * xi * xi + 2.0 * s * t + d0 * (1.0 - xi) ** 2)) - 2.0 * torch.log(den)
    if inverse:
        lad = -lad
    return torch.where(inside, out, v), torch.where(inside, lad, 0.0)
