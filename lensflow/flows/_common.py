"""Small helpers shared by the flow layers (not public API)."""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import Tensor, nn

PADDINGS = ("zero", "circular")
COUPLINGS = ("affine", "spline")


def acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype in which log-determinants are accumulated: float64 for float64 inputs, else float32.

    Under bf16 autocast the flow stream stays float32, and so do all log-dets.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stream_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the invertible data stream: never below float32 (bf16/fp16 would break invertibility)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast for the exact (invertible) parts of a layer on ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def check_coupling(coupling: str) -> str:
    if not isinstance(coupling, str) or coupling not in COUPLINGS:
        raise ValueError(f"coupling must be 'affine' or 'spline', got {coupling!r}")
    return coupling


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_cond(cond: Tensor | None, cond_dim: int, batch: int, where: str) -> Tensor | None:
    """Validate ``cond`` ([B, cond_dim] float) against the layer's ``cond_dim``; shape checks only, no sync."""
    if cond_dim == 0:
        if cond is not None:
            raise ValueError(f"cond: {where} was built with cond_dim=0 but a cond tensor was given")
        return None
    if cond is None:
        raise ValueError(f"cond: {where} was built with cond_dim={cond_dim} and needs cond of shape [B, {cond_dim}]")
    if cond.dim() != 2 or cond.shape[1] != cond_dim or cond.shape[0] != batch:
        raise ValueError(f"cond must have shape [{batch}, {cond_dim}], got {tuple(cond.shape)}")
    if not cond.is_floating_point():
        raise ValueError(f"cond must be a floating-point tensor, got dtype {cond.dtype}")
    return cond


def polynomial_basis(cond: Tensor, degree: int) -> Tensor:
    """Tensor-product monomials ``Π_p θ_p^{k_p}``, ``0 ≤ k_p ≤ degree``, of ``cond`` [B, P]: ``[B, (degree+1)^P]``
    (float64; the first column is 1)."""
    c = cond.to(torch.float64)
    powers = torch.stack([c**k for k in range(degree + 1)], dim=-1)  # [B, P, degree + 1]
    cols = []
    for ks in itertools.product(range(degree + 1), repeat=c.shape[1]):
        col = torch.ones(c.shape[0], dtype=torch.float64, device=c.device)
        for p, k in enumerate(ks):
            col = col * powers[:, p, k]
        cols.append(col)
    return torch.stack(cols, dim=1)


class DataInitialized(nn.Module):
    """Base of the layers with a data-dependent initialisation (ActNorm, the Gaussian layers).

    ``initialized`` is a persistent buffer, so a model restored with ``load_state_dict`` is never initialised again;
    ``is_initialized`` reads it once into a Python mirror, so the hot path does not read a (possibly CUDA) buffer
    every call, and a load re-reads it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._init_known = False

    @property
    def is_initialized(self) -> bool:
        if not self._init_known:
            self._init_known = bool(self.initialized.item())
        return self._init_known

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._init_known = False  # re-read the loaded flag on next use

    def _mark_initialized(self) -> None:
        self.initialized.fill_(1)
        self._init_known = True
