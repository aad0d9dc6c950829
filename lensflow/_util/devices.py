"""Device resolution: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, with one message when CUDA is missing."""

from __future__ import annotations

from typing import Any

import torch

from lensflow._util.checks import check_int

__all__ = ["ACCELERATORS", "resolve_device", "resolve_devices"]

ACCELERATORS = ("auto", "cpu", "cuda")


def resolve_device(spec: Any, name: str = "device") -> torch.device:
    """One torch device from ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    s = str(spec or "auto")
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(s)
    except RuntimeError:
        raise ValueError(f"{name}: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {spec!r} requested but CUDA is not available")
    return dev


def resolve_devices(devices: Any, accelerator: str) -> tuple[str, int]:
    """``(kind, count)`` for multi-process work: ``devices`` is ``auto`` or a positive integer."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    cuda = torch.cuda.is_available() and accelerator != "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("accelerator=cuda, but no CUDA device is available")
    if devices in (None, "auto"):
        return ("cuda", torch.cuda.device_count()) if cuda else ("cpu", 1)
    if isinstance(devices, str):
        try:
            devices = int(devices)
        except ValueError:
            raise ValueError(f"devices must be 'auto' or a positive integer, got {devices!r}") from None
    n = check_int("devices", devices, 1)
    if cuda and n > torch.cuda.device_count():
        raise ValueError(f"devices={n}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return ("cuda" if cuda else "cpu"), n
