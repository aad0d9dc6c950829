"""Invertible 1x1 convolution in LU parametrisation (Kingma & Dhariwal 2018, sec. 3.2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import acc_dtype, check_positive_int, no_autocast, stream_dtype


class InvConv1x1(nn.Module):
    """Channel mixing ``y = W x`` at every pixel, ``W = P L (U + diag(sign_s * exp(log_s)))``.

    ``P`` (permutation) and ``sign_s`` are fixed buffers; ``lower`` (strictly lower part of a unit-lower
    ``L``), ``upper`` (strictly upper part of ``U``) and ``log_s`` are trained. Initialised from a random
    orthogonal matrix, so ``log|det W| = sum(log_s) = 0`` at the start. ``logdet = H * W * sum(log_s)``
    is evaluated in float32/float64 (never in bf16, even under autocast), and so is the convolution.

    The inverse ``W^-1 = U^-1 L^-1 P^T`` comes from two triangular solves in float64. In eval mode
    without autograd, ``W`` and ``W^-1`` are cached; the cache is keyed on the parameters' version
    counters (bumped by optimiser steps, ``load_state_dict``, ``AveragedModel.update_parameters``), cleared
    by ``train()``/``eval()``/``.to()`` and not carried by ``copy.deepcopy``. Writing weights through
    ``param.data`` bypasses the version counters: call :meth:`clear_cache` after doing that.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        self.channels = channels
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(s.abs()).to(dtype))
        self._cache: tuple[Any, Tensor, Tensor] | None = None

    # -- cache management -------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def train(self, mode: bool = True) -> InvConv1x1:
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._cache = None
        return super()._apply(fn, recurse)

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        ps = (self.lower, self.upper, self.log_s, self.sign_s, self.perm)
        return (dtype, self.log_s.device) + tuple((p._version, p.data_ptr()) for p in ps)

    def _use_cache(self) -> bool:
        return not self.training and not (torch.is_grad_enabled() and self.log_s.requires_grad)

    # -- weights ----------------------------------------------------------------------------------------
    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=dtype, device=self.log_s.device)
        lower = torch.tril(self.lower.to(dtype), -1) + eye
        upper = torch.triu(self.upper.to(dtype), 1) + torch.diag(self.sign_s.to(dtype) * self.log_s.to(dtype).exp())
        return self.perm.to(dtype), lower, upper

    def _weight(self, dtype: torch.dtype) -> Tensor:
        p, lower, upper = self._factors(dtype)
        return p @ lower @ upper

    def _inverse_weight(self, dtype: torch.dtype) -> Tensor:
        # Two triangular solves in float64, whatever the working precision.
        p, lower, upper = self._factors(torch.float64)
        linv_pt = torch.linalg.solve_triangular(lower, p.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, linv_pt, upper=True).to(dtype)

    def _cached(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = self._cache_key(dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._weight(dtype), self._inverse_weight(dtype))
        return self._cache[1], self._cache[2]

    def weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W`` as a [C, C] matrix in ``dtype`` (default: the parameters' dtype)."""
        dtype = dtype or self.log_s.dtype
        return self._cached(dtype)[0] if self._use_cache() else self._weight(dtype)

    def inverse_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W^-1`` as a [C, C] matrix in ``dtype`` (default: the parameters' dtype)."""
        dtype = dtype or self.log_s.dtype
        return self._cached(dtype)[1] if self._use_cache() else self._inverse_weight(dtype)

    def _logdet(self, x: Tensor) -> Tensor:
        ld = self.log_s.to(acc_dtype(x)).sum() * (x.shape[2] * x.shape[3])
        return ld.expand(x.shape[0])

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> latent direction. Returns ``(W x, logdet[B])``."""
        with no_autocast(x):
            x = x.to(stream_dtype(x))
            w = self.weight(x.dtype)
            y = F.conv2d(x, w.view(self.channels, self.channels, 1, 1))
        return y, self._logdet(x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        with no_autocast(y):
            y = y.to(stream_dtype(y))
            w_inv = self.inverse_weight(y.dtype)
            return F.conv2d(y, w_inv.view(self.channels, self.channels, 1, 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
