"""Fixed, invertible pixel-wise preprocessing of κ maps in front of the flow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._common import acc_dtype, check_positive_int, polynomial_basis

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

    **Conditional** (``cond_dim = P > 0`` and ``cond_degree = d``): the shift, mean and std depend on the
    (normalised) parameters θ, as ``log λ(θ)``, ``mean(θ)`` and ``log std(θ)`` tensor-product polynomials of degree
    ``d`` in each parameter (buffers ``log_shift_coef``, ``mean_coef``, ``log_std_coef`` [(d+1)^P, C]). A lognormal
    field's log has mean ``log λ − σ²(θ)/2`` and std ``σ(θ)`` (and in N-body fields λ itself moves with θ); one pooled
    mean leaves every other θ a field whose mean is not zero, which the zero-mean Gaussian layer behind it cannot fit.
    :meth:`fit` estimates them per distinct θ of the training maps and smooths them by least squares (weighted by
    maps), so any design with at least (d+1)^P distinct θ works. ``shift``, ``mean`` and ``std`` then hold the values
    at θ = 0 (the training mean).

    All state is in buffers (``mean``, ``std``, ``shift`` [C]; ``fitted``, ``log_shift_flag``) and is
    saved in a ``state_dict``. Before :meth:`fit` the map is the identity (mean 0, std 1), unless
    ``log_shift`` is on, which needs a shift: either pass ``shift`` (e.g. the lognormal shift parameter λ
    from theory, in κ units) or let :meth:`fit` choose one.

    Args:
        channels: number of map channels (tomographic bins).
        log_shift: use the shifted log (for lognormal-like κ).
        shift: fixed shift(s), κ units; ``None`` lets :meth:`fit` choose one (see ``shift_method``).
        margin: safety margin of the ``"margin"`` shift, in units of the per-channel std of κ (default 1).
        shift_scale: the ``"ml"`` shift times this (>= 1). A larger shift makes the log closer to linear: the Gaussian
            part then carries less of the one-point skewness and modulates small scales less by the local κ (N-body
            maps, whose skewness sits in halos: docs/nbody.md), leaving more to the flow.
        shift_method: how :meth:`fit` chooses the shift: ``"ml"``, the maximum-likelihood shift of a shifted
            lognormal one-point PDF (see :func:`ml_shift`; for shifted-lognormal κ it recovers the true λ), or
            ``"margin"``, ``-min(κ) + margin * std(κ)`` (the choice of lensflow <= 0.1; it puts the support's edge
            ``margin`` standard deviations below the lowest training pixel, where a flow then places mass).
        cond_dim: conditioning parameters P of the flow (0: unconditional).
        cond_degree: with ``cond_dim > 0``, the polynomial degree of the θ-dependent statistics (``None``: one set
            of statistics for all θ, the choice of lensflow <= 0.2).
    """

    def __init__(
        self,
        channels: int,
        log_shift: bool = False,
        shift: float | Sequence[float] | None = None,
        margin: float = 1.0,
        shift_method: str = "margin",
        cond_dim: int = 0,
        cond_degree: int | None = None,
        shift_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("cond_dim", cond_dim, minimum=0)
        if cond_degree is not None:
            check_positive_int("cond_degree", cond_degree, minimum=0)
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        if shift_method not in SHIFT_METHODS:
            raise ValueError(f"shift_method must be one of {SHIFT_METHODS}, got {shift_method!r}")
        if not (isinstance(shift_scale, (int, float)) and math.isfinite(shift_scale) and shift_scale >= 1):
            raise ValueError(f"shift_scale must be a number >= 1 (the support holds every pixel), got {shift_scale!r}")
        if shift_scale != 1 and shift_method != "ml":
            raise ValueError(f"shift_scale={shift_scale!r} scales the ml shift; shift_method is {shift_method!r}")
        self.shift_scale = float(shift_scale)
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
        self.cond_dim = int(cond_dim)
        self.cond_degree = int(cond_degree) if cond_degree is not None and cond_dim else None
        if self.conditional:
            k = (self.cond_degree + 1) ** self.cond_dim
            for name in ("log_shift_coef", "mean_coef", "log_std_coef"):
                self.register_buffer(name, torch.zeros(k, channels, dtype=torch.float64))
            self.log_shift_coef[0] = torch.log(self.shift.clamp_min(1e-300))
        self._shift_ready = not self.log_shift or self._fixed_shift

    @property
    def conditional(self) -> bool:
        """Whether the statistics depend on the condition."""
        return self.cond_degree is not None

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
        names = ("mean", "std", "shift") + (("log_shift_coef", "mean_coef", "log_std_coef") if self.conditional else ())
        saved = {k: getattr(self, k) for k in names}
        out = super()._apply(fn, recurse)
        for k, v in saved.items():
            setattr(self, k, v.to(getattr(self, k).device))
        return out

    @torch.no_grad()
    def fit(self, maps: Tensor | np.ndarray, cond: Tensor | None = None, chunk: int = 256) -> None:
        """Set the statistics from training maps ``[N, C, H, W]`` (κ units), accumulated in float64.

        With ``log_shift`` and no fixed ``shift``, the shift is the maximum-likelihood one (``shift_method="ml"``)
        or ``max(-min κ, 0) + margin * std κ`` per channel (``"margin"``); either way every training pixel sits
        inside the support ``κ > -shift``. A conditional preprocessing needs the maps' normalised conditions
        ``cond`` [N, P] and fits its statistics per distinct θ, then smooths them over θ (see the class docstring).
        """
        maps = torch.as_tensor(maps)
        if maps.dim() != 4 or maps.shape[1] != self.channels:
            raise ValueError(f"maps must have shape [N, {self.channels}, H, W], got {tuple(maps.shape)}")
        if maps.shape[0] == 0:
            raise ValueError("maps: need at least one map to fit")
        if self.conditional:
            self._fit_conditional(maps, cond, chunk)
            return
        shift, m1, sd = self._fit_stats(maps, chunk, None)
        self.shift.copy_(shift)
        self.mean.copy_(m1)
        self.std.copy_(sd)
        self.fitted.fill_(1)
        self._shift_ready = True

    def _fit_stats(self, maps: Tensor, chunk: int, shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(shift, mean, std) [C] of one set of maps; the shift is fitted unless fixed or given."""
        if shift is None:
            shift = self.shift.clone()
            if self.log_shift and not self._fixed_shift:
                m1, m2 = self._moments(maps, chunk, lambda x: x)
                sd = (m2 - m1 * m1).clamp_min(0).sqrt()
                if not bool(torch.all(sd > 0)):
                    raise ValueError("maps: a channel is constant, cannot fit a shift")
                lo = self._chunked_min(maps, chunk)
                if self.shift_method == "ml":
                    arr = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
                    fitted = [self.shift_scale * ml_shift(arr[:, c]) for c in range(self.channels)]
                    shift = torch.tensor(fitted, dtype=torch.float64, device=self.mean.device)
                else:
                    shift = (-lo).clamp_min(0) + self.margin * sd
        if self.log_shift:
            sh = shift.view(1, -1, 1, 1)
            if not bool(torch.all(self._chunked_min(maps, chunk) + shift > 0)):
                raise ValueError("maps: some pixels are <= -shift, outside the shifted-log support")
            m1, m2 = self._moments(maps, chunk, lambda x: torch.log(x + sh))
        else:
            m1, m2 = self._moments(maps, chunk, lambda x: x)
        sd = (m2 - m1 * m1).clamp_min(0).sqrt()
        if not bool(torch.all(sd > 0)):
            raise ValueError("maps: a channel has zero variance, cannot standardise")
        return shift, m1, sd

    def _fit_conditional(self, maps: Tensor, cond: Tensor | None, chunk: int) -> None:
        if cond is None:
            raise ValueError("cond: a conditional Preprocess is fitted on maps and their normalised conditions [N, P]")
        cond = torch.as_tensor(cond)
        if cond.dim() != 2 or cond.shape != (maps.shape[0], self.cond_dim):
            raise ValueError(f"cond must have shape [{maps.shape[0]}, {self.cond_dim}], got {tuple(cond.shape)}")
        uniq, inv = torch.unique(cond.detach().cpu().to(torch.float64), dim=0, return_inverse=True)
        k = self.mean_coef.shape[0]
        if uniq.shape[0] < k:
            raise ValueError(
                f"Preprocess: statistics of degree {self.cond_degree} in {self.cond_dim} parameters need at least {k} "
                f"distinct conditions, the maps have {uniq.shape[0]}; lower model.shift_degree or add maps"
            )
        groups = [(inv == g).nonzero().squeeze(1) for g in range(uniq.shape[0])]
        phi = polynomial_basis(uniq, self.cond_degree)  # [G, K]
        w = torch.tensor([len(rows) for rows in groups], dtype=torch.float64).sqrt()[:, None]
        if int(torch.linalg.matrix_rank(phi * w)) < k:
            raise ValueError(
                f"Preprocess: the {uniq.shape[0]} distinct conditions do not determine a degree-{self.cond_degree} "
                "polynomial (too few values along a parameter); lower model.shift_degree"
            )

        def smooth(values: Tensor) -> Tensor:  # weighted least squares [G, C] -> coefficients [K, C]
            return torch.linalg.lstsq(phi * w, values * w).solution

        dev = self.mean.device
        if self.log_shift and not self._fixed_shift:
            raw = torch.stack([self._fit_stats(maps[rows], chunk, None)[0].cpu() for rows in groups])
            self.log_shift_coef.copy_(smooth(torch.log(raw)))
        shifts = torch.exp(phi @ self.log_shift_coef.cpu()).to(dev)
        stats = []
        for g, rows in enumerate(groups):
            try:
                stats.append(self._fit_stats(maps[rows], chunk, shifts[g])[1:])
            except ValueError as err:
                raise ValueError(
                    f"{err} at condition {uniq[g].tolist()} after smoothing the shift over θ; lower model.shift_degree"
                ) from None
        self.mean_coef.copy_(smooth(torch.stack([m for m, _ in stats]).cpu()))
        self.log_std_coef.copy_(smooth(torch.log(torch.stack([s for _, s in stats]).cpu())))
        if self.log_shift:
            self.shift.copy_(torch.exp(self.log_shift_coef[0]))
        self.mean.copy_(self.mean_coef[0])
        self.std.copy_(torch.exp(self.log_std_coef[0]))
        self.fitted.fill_(1)
        self._shift_ready = True

    def statistics(self, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(shift, mean, std)``, float64: ``[B, C]`` at normalised ``cond`` [B, P] if conditional, else ``[1, C]``."""
        if not self.conditional:
            return self.shift.view(1, -1), self.mean.view(1, -1), self.std.view(1, -1)
        if cond is None:
            raise ValueError(
                f"cond: this Preprocess has cond_dim={self.cond_dim}; pass cond of shape [B, {self.cond_dim}]"
            )
        phi = polynomial_basis(cond.to(self.mean_coef.device), self.cond_degree)
        shift = torch.exp(phi @ self.log_shift_coef) if self.log_shift else self.shift.view(1, -1).expand(len(phi), -1)
        return shift, phi @ self.mean_coef, torch.exp(phi @ self.log_std_coef)

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
    def _check(self, x: Tensor, name: str, cond: Tensor | None) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{name} must have shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        if self.conditional and (cond is None or cond.dim() != 2 or cond.shape != (x.shape[0], self.cond_dim)):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond: this Preprocess needs cond of shape [{x.shape[0]}, {self.cond_dim}], got {got}")
        if self.log_shift and not self._shift_ready:
            raise ValueError("Preprocess(log_shift=True) has no shift yet: call fit(maps) or pass shift=")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """κ -> standardised ``y``. Returns ``(y, logdet[B])`` with ``logdet = sum log|dy/dx|``."""
        self._check(x, "x", cond)
        dt = acc_dtype(x)
        x = x.to(dt)
        shift, mean, std = (t.to(x.device, dt)[:, :, None, None] for t in self.statistics(cond))
        hw = x.shape[2] * x.shape[3]
        logdet = (-torch.log(std).sum(dim=(1, 2, 3)) * hw).expand(x.shape[0])
        if self.log_shift:
            u = torch.log(torch.maximum(x + shift, _EDGE * shift))
            return (u - mean) / std, logdet - u.sum(dim=(1, 2, 3))
        return (x - mean) / std, logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        """Standardised ``y`` -> κ."""
        self._check(y, "y", cond)
        dt = acc_dtype(y)
        shift, mean, std = (t.to(y.device, dt)[:, :, None, None] for t in self.statistics(cond))
        u = y.to(dt) * std + mean
        return torch.exp(u) - shift if self.log_shift else u

    def extra_repr(self) -> str:
        extra = f", cond_dim={self.cond_dim}, cond_degree={self.cond_degree}" if self.conditional else ""
        return f"channels={self.channels}, log_shift={self.log_shift}, shift_method={self.shift_method}{extra}"
