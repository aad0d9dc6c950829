"""Angle units: the one ``ARCMIN`` of lensflow (pixel scales and smoothing σ are given in arcmin)."""

from __future__ import annotations

import math

__all__ = ["ARCMIN"]

#: One arcminute in radians.
ARCMIN = math.pi / (180.0 * 60.0)
