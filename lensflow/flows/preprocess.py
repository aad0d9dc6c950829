"""Fixed, invertible pixel-wise preprocessing of κ maps in front of the flow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_positive_int

# Points at or below -shift have zero density under a shifted-log model. They are clamped to
# (1e-6 * shift) above the support edge, which gives a very low but finite log-density instead of NaN,
# so one stray map cannot poison a training step.
_EDGE = 1e-6
SHIFT_METHODS = ("ml", "margin")
# Pixels used by the maximum-likelihood shift fit (a random subset beyond this; ~1 s per channel).
_ML_PIXELS = 1 << 22


def ml_shift(kappa: np.ndarray, floor_sigma: float = 0.01, seed: int = 0) -> float:
    """Maximum-likelihood shift λ of a shifted-lognormal one-point PDF fitted to pixels ``kappa`` (κ units).

    Maximises the profile log-likelihood ``-½ log Var[u] - E[u]``, ``u = log(κ + λ)`` (a Gaussian in ``u`` with
    its mean and variance profiled out, plus the Jacobian of the log) over ``λ > -min κ``. For shifted-lognormal
    fields every pixel's marginal is exactly of this form, so the fit is consistent (64² maps of the
    ``kappa_quick`` field: 0.1 % from the simulator's λ with 3,200 maps). The three-parameter lognormal's
    likelihood also rises without bound within ~1e-8 σ of ``-min κ`` (Hill 1963); the interior maximum is taken,
    and the result is kept at least ``floor_sigma`` standard deviations above ``-min κ``.
    """
    from scipy.optimize import minimize_scalar

    x = np.asarray(kappa, dtype=np.float64).ravel()
    if x.size > _ML_PIXELS:
        x = np.random.default_rng(seed).choice(x, _ML_PIXELS, replace=False)
    lo, sd = float(x.min()), float(x.std())
    if not sd > 0:
        raise ValueError("maps: a channel is constant, cannot fit a shift")
    floor = -lo + floor_sigma * sd

    def nll(t: float) -> float:  # t = log((λ + min κ) / σ)
        u = np.log(x - lo + sd * math.exp(t))
        return 0.5 * math.log(u.var()) + u.mean()

    # Scan log-spaced offsets above the minimum, then refine around the best interior point.
    ts = np.linspace(math.log(floor_sigma), math.log(100.0), 60)
    vals = np.array([nll(t) for t in ts])
    i = int(np.argmin(vals))
    if i in (0, ts.size - 1):  # no interior maximum: the PDF is far from lognormal; stay near the edge
        return max(floor, -lo + sd * math.exp(ts[i]))
    res = minimize_scalar(nll, bounds=(ts[i - 1], ts[i + 1]), method="bounded", options={"xatol": 1e-6})
    return max(floor, -lo + sd * math.exp(res.x))


class Preprocess(nn.Module):
    """``y = (u - mean) / std`` per channel, with ``u = log(x + shift)`` if ``log_shift`` else ``u = x``.

    ``x`` is in κ units. ``forward`` returns the log-Jacobian ``log|dy/dx|`` summed over pixels
    (``-sum(log std)`` per pixel, plus ``-sum(log(x + shift))`` with the log), so a flow's ``log_prob``
    on ``y`` plus this term is the density of κ itself, comparable between preprocessing choices.

    All state is in buffers (``mean``, ``std``, ``shift`` [C]; ``fitted``, ``log_shift_flag``) and is
    saved in a ``state_dict``. Before :meth:`fit` the map is the identity (mean 0, std 1), unless
    ``log_shift`` is on, which needs a shift: either pass ``shift`` (e.g. the lognormal shift parameter λ
    from theory, in κ units) or let :meth:`fit` choose one.

    Args:
        channels: number of map channels (tomographic bins).
        log_shift: use the shifted log (for lognormal-like κ).
        shift: fixed shift(s), κ units; ``None`` lets :meth:`fit` choose one (see ``shift_method``).
        margin: safety margin of the ``"margin"`` shift, in units of the per-channel std of κ (default 1).
        shift_method: how :meth:`fit` chooses the shift: ``"ml"``, the maximum-likelihood shift of a shifted
            lognormal one-point PDF (see :func:`ml_shift`; for shifted-lognormal κ it recovers the true λ), or
            ``"margin"``, ``-min(κ) + margin * std(κ)`` (the choice of lensflow <= 0.1; it puts the support's edge
            ``margin`` standard deviations below the lowest training pixel, where a flow then places mass).
    """

    def __init__(
        self,
        channels: int,
        log_shift: bool = False,
        shift: float | Sequence[float] | None = None,
        margin: float = 1.0,
        shift_method: str = "margin",
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        if shift_method not in SHIFT_METHODS:
            raise ValueError(f"shift_method must be one of {SHIFT_METHODS}, got {shift_method!r}")
        self.channels = channels
        self.log_shift = bool(log_shift)
        self.margin = float(margin)
        self.shift_method = shift_method
        self.register_buffer("mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("std", torch.ones(channels, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("log_shift_flag", torch.tensor(int(self.log_shift), dtype=torch.uint8))
        self._fixed_shift = shift is not None
        if shift is not None:
            if not self.log_shift:
                raise ValueError("shift: only meaningful with log_shift=True")
            s = torch.as_tensor(shift, dtype=torch.float64).flatten()
            if s.numel() == 1:
                s = s.expand(channels)
            if s.numel() != channels or not bool(torch.all(torch.isfinite(s) & (s > 0))):
                raise ValueError(f"shift must be one positive finite value or {channels} of them, got {shift!r}")
            self.shift.copy_(s)
        self._shift_ready = not self.log_shift or self._fixed_shift

    # -- state --------------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        flag = state_dict.get(prefix + "log_shift_flag")
        if flag is not None and bool(flag) != self.log_shift:
            raise ValueError(
                f"log_shift: state_dict has log_shift={bool(flag)} but this Preprocess was built with "
                f"log_shift={self.log_shift}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._shift_ready = not self.log_shift or bool(self.fitted.item()) or bool((self.shift > 0).all())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # The statistics stay float64 whatever the module is cast to (model.float(), bf16, ...): only
        # their device follows the module.
        saved = {k: getattr(self, k) for k in ("mean", "std", "shift")}
        out = super()._apply(fn, recurse)
        for k, v in saved.items():
            setattr(self, k, v.to(getattr(self, k).device))
        return out

    @torch.no_grad()
    def fit(self, maps: Tensor | np.ndarray, chunk: int = 256) -> None:
        """Set the statistics from training maps ``[N, C, H, W]`` (κ units), accumulated in float64.

        With ``log_shift`` and no fixed ``shift``, the shift is the maximum-likelihood one (``shift_method="ml"``)
        or ``max(-min κ, 0) + margin * std κ`` per channel (``"margin"``); either way every training pixel sits
        inside the support ``κ > -shift``.
        """
        maps = torch.as_tensor(maps)
        if maps.dim() != 4 or maps.shape[1] != self.channels:
            raise ValueError(f"maps must have shape [N, {self.channels}, H, W], got {tuple(maps.shape)}")
        if maps.shape[0] == 0:
            raise ValueError("maps: need at least one map to fit")
        if self.log_shift and not self._fixed_shift:
            m1, m2 = self._moments(maps, chunk, lambda x: x)
            sd = (m2 - m1 * m1).clamp_min(0).sqrt()
            if not bool(torch.all(sd > 0)):
                raise ValueError("maps: a channel is constant, cannot fit a shift")
            lo = self._chunked_min(maps, chunk)
            if self.shift_method == "ml":
                arr = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
                fitted = [ml_shift(arr[:, c]) for c in range(self.channels)]
                self.shift.copy_(torch.tensor(fitted, dtype=torch.float64))
            else:
                self.shift.copy_((-lo).clamp_min(0) + self.margin * sd)
        if self.log_shift:
            shift = self.shift.view(1, -1, 1, 1)
            if not bool(torch.all(self._chunked_min(maps, chunk) + self.shift > 0)):
                raise ValueError("maps: some pixels are <= -shift, outside the shifted-log support")
            m1, m2 = self._moments(maps, chunk, lambda x: torch.log(x + shift))
        else:
            m1, m2 = self._moments(maps, chunk, lambda x: x)
        sd = (m2 - m1 * m1).clamp_min(0).sqrt()
        if not bool(torch.all(sd > 0)):
            raise ValueError("maps: a channel has zero variance, cannot standardise")
        self.mean.copy_(m1)
        self.std.copy_(sd)
        self.fitted.fill_(1)
        self._shift_ready = True

    def _chunked_min(self, maps: Tensor, chunk: int) -> Tensor:
        lo = torch.full((self.channels,), float("inf"), dtype=torch.float64, device=self.mean.device)
        for i in range(0, maps.shape[0], chunk):
            lo = torch.minimum(lo, maps[i : i + chunk].to(lo.device, torch.float64).amin(dim=(0, 2, 3)))
        return lo

    def _moments(self, maps: Tensor, chunk: int, f) -> tuple[Tensor, Tensor]:
        dev = self.mean.device
        s1 = torch.zeros(self.channels, dtype=torch.float64, device=dev)
        s2 = torch.zeros_like(s1)
        for i in range(0, maps.shape[0], chunk):
            u = f(maps[i : i + chunk].to(dev, torch.float64))
            if not bool(torch.isfinite(u).all()):
                raise ValueError("maps: contain NaN or Inf")
            s1 += u.sum(dim=(0, 2, 3))
            s2 += (u * u).sum(dim=(0, 2, 3))
        n = maps.shape[0] * maps.shape[2] * maps.shape[3]
        return s1 / n, s2 / n

    # -- transform ----------------------------------------------------------------------------------------
    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{name} must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        if self.log_shift and not self._shift_ready:
            raise ValueError("Preprocess(log_shift=True) has no shift yet: call fit(maps) or pass shift=")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """κ -> standardised ``y``. Returns ``(y, logdet[B])`` with ``logdet = sum log|dy/dx|``."""
        self._check(x, "x")
        dt = acc_dtype(x)
        x = x.to(dt)
        mean, std = self.mean.to(dt).view(1, -1, 1, 1), self.std.to(dt).view(1, -1, 1, 1)
        hw = x.shape[2] * x.shape[3]
        logdet = -torch.log(self.std.to(dt)).sum() * hw
        if self.log_shift:
            shift = self.shift.to(dt).view(1, -1, 1, 1)
            xs = torch.maximum(x + shift, _EDGE * shift)
            u = torch.log(xs)
            y = (u - mean) / std
            return y, logdet - u.sum(dim=(1, 2, 3))
        return (x - mean) / std, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        """Standardised ``y`` -> κ."""
        self._check(y, "y")
        dt = acc_dtype(y)
        y = y.to(dt)
        u = y * self.std.to(dt).view(1, -1, 1, 1) + self.mean.to(dt).view(1, -1, 1, 1)
        if self.log_shift:
            return torch.exp(u) - self.shift.to(dt).view(1, -1, 1, 1)
        return u

    def extra_repr(self) -> str:
        return f"channels={self.channels}, log_shift={self.log_shift}, shift_method={self.shift_method}"
