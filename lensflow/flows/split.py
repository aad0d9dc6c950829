"""Multi-scale split with a learned conditional prior, and the learned top prior."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_cond, check_positive_int, stream_dtype
from .nets import CouplingNet, ZeroConv2d


def _soft_clamp(raw: Tensor, bound: float) -> Tensor:
    return bound * torch.tanh(raw / bound)


class Split(nn.Module):
    """Factor out half of the channels, whitened by a Gaussian prior conditioned on the kept half.

    ``x = (h, z)`` with ``h`` the first ``channels - channels // 2`` channels (kept and passed to the next
    level) and ``z`` the rest. The prior is ``z ~ N(mu, sigma^2)`` per element, with
    ``(mu, log sigma) = ZeroConv2d(h) + Linear(cond)`` (per-channel bias from ``cond``); ``log sigma`` is
    soft-clamped to ``(-prior_bound, prior_bound)``. The layer outputs the whitened latent
    ``eps = (z - mu) / sigma``, which is standard normal under the model, and
    ``logdet = -sum(log sigma)``. Both prior pieces start at zero (``eps = z``).

    ``hidden > 0`` replaces the linear ``ZeroConv2d(h)`` (openai/glow's ``Conv2dZeros``) by a
    :class:`~lensflow.flows.nets.CouplingNet` of that width whose first layer is FiLM-modulated by the kept
    half's per-channel spatial mean and standard deviation. A linear 3x3 prior can move the mean of ``z`` with
    ``h`` but cannot make its spread grow with ``|h|``, nor with the whole map's content; on N-body maps the
    small-scale spread of a map follows its halos (its variance and skewness are correlated), which needs both.
    The prior is still a function of ``h`` alone, so the likelihood stays exact.

    ``forward(x, cond) -> (h, eps, logdet[B])`` and ``inverse(h, eps, cond) -> x``.
    """

    def __init__(
        self,
        channels: int,
        cond_dim: int = 0,
        padding: str = "zero",
        prior_bound: float = 5.0,
        hidden: int = 0,
    ):
        super().__init__()
        check_positive_int("channels", channels, minimum=2)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        check_positive_int("hidden", hidden, minimum=0)
        if not prior_bound > 0:
            raise ValueError(f"prior_bound must be > 0, got {prior_bound!r}")
        self.channels = channels
        self.n_keep = channels - channels // 2
        self.n_out = channels // 2
        self.cond_dim = cond_dim
        self.prior_bound = float(prior_bound)
        self.hidden = int(hidden)
        if self.hidden:
            self.prior = CouplingNet(self.n_keep, 2 * self.n_out, self.hidden, 2 * self.n_keep, padding)
        else:
            self.prior = ZeroConv2d(self.n_keep, 2 * self.n_out, padding)
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, 2 * self.n_out)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def _mean_logsd(self, h: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        cond = check_cond(cond, self.cond_dim, h.shape[0], "Split")
        if self.hidden:
            # map-level context: per-channel spatial mean and std of the kept half ([B, 2 n_keep])
            var, mean = torch.var_mean(h, dim=(2, 3))
            ctx = torch.cat([mean, (var + 1e-6).sqrt()], dim=1)  # the 1e-6 keeps the gradient finite on flat maps
            p = self.prior(h, ctx.to(self.prior.film.weight.dtype)).to(stream_dtype(h))
        else:
            p = self.prior(h).to(stream_dtype(h))
        if self.cond_dim:
            p = p + self.cond_proj(cond).to(p.dtype)[:, :, None, None]
        mean, raw = p[:, : self.n_out], p[:, self.n_out :]
        return mean, _soft_clamp(raw, self.prior_bound)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        h, z = x[:, : self.n_keep], x[:, self.n_keep :]
        mean, logsd = self._mean_logsd(h, cond)
        eps = (z - mean) * (-logsd).exp()
        return h, eps.to(x.dtype), -logsd.to(acc_dtype(x)).sum(dim=(1, 2, 3))

    def inverse(self, h: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        mean, logsd = self._mean_logsd(h, cond)
        z = mean + logsd.exp() * eps
        return torch.cat([h, z.to(h.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, keep={self.n_keep}, prior_bound={self.prior_bound}, hidden={self.hidden}"


class TopPrior(nn.Module):
    """Gaussian prior of the last level's output, whitened: ``eps = (h - mu) / sigma``.

    ``mu`` and ``log sigma`` are per channel: learned constants (if ``learn``) plus ``Linear(cond)`` (if
    ``cond_dim``), both starting at zero. ``log sigma`` is soft-clamped to ``(-prior_bound, prior_bound)``.
    With ``learn=False`` and ``cond_dim=0`` the prior is a fixed standard normal (identity map).
    """

    def __init__(self, channels: int, cond_dim: int = 0, learn: bool = True, prior_bound: float = 5.0):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        self.channels = channels
        self.cond_dim = cond_dim
        self.learn = bool(learn)
        self.prior_bound = float(prior_bound)
        if self.learn:
            self.mean = nn.Parameter(torch.zeros(channels))
            self.logsd = nn.Parameter(torch.zeros(channels))
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, 2 * channels)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    @property
    def trivial(self) -> bool:
        return not self.learn and not self.cond_dim

    def _mean_logsd(self, h: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        cond = check_cond(cond, self.cond_dim, h.shape[0], "TopPrior")
        dt = stream_dtype(h)
        mean = h.new_zeros(1, self.channels, dtype=dt)
        raw = h.new_zeros(1, self.channels, dtype=dt)
        if self.learn:
            mean = mean + self.mean.to(dt)
            raw = raw + self.logsd.to(dt)
        if self.cond_dim:
            m, r = self.cond_proj(cond).to(dt).chunk(2, dim=1)
            mean, raw = mean + m, raw + r
        return mean[:, :, None, None], _soft_clamp(raw, self.prior_bound)[:, :, None, None]

    def forward(self, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.trivial:
            check_cond(cond, 0, h.shape[0], "TopPrior")
            return h, h.new_zeros(h.shape[0], dtype=acc_dtype(h))
        mean, logsd = self._mean_logsd(h, cond)
        eps = (h - mean) * (-logsd).exp()
        logdet = -logsd.to(acc_dtype(h)).sum(dim=(1, 2, 3)) * (h.shape[2] * h.shape[3])
        return eps.to(h.dtype), logdet.expand(h.shape[0])

    def inverse(self, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.trivial:
            return eps
        mean, logsd = self._mean_logsd(eps, cond)
        return (mean + logsd.exp() * eps).to(eps.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, learn={self.learn}, cond_dim={self.cond_dim}"
