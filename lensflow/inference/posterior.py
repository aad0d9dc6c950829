"""Posteriors on a parameter grid: normalisation, moments, credible intervals, credible-region coverage, FoM.

A uniform prior on a box and a log-likelihood evaluated on a regular grid over it give the posterior on that
grid. Summaries integrate it with the trapezoid rule (linear interpolation between nodes), so a posterior a
few grid cells wide is still summarised to a fraction of a cell. A posterior *narrower* than a cell (one 64² κ map
pins σ_8 Ω_m^0.5 to ~1 %, less than a 15² grid's spacing over the box) needs :func:`refine_loglike`: the
log-likelihood, smooth in θ where the density is not, is interpolated with a cubic spline onto a finer grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import RegularGridInterpolator

__all__ = ["GridPosterior", "ParameterGrid", "refine_loglike"]


@dataclass(frozen=True)
class ParameterGrid:
    """A regular grid over a box: ``names`` [P], ``lo``/``hi`` [P] and ``points`` nodes per axis."""

    names: tuple[str, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    points: tuple[int, ...]

    def __post_init__(self) -> None:
        p = len(self.names)
        if not (len(self.lo) == len(self.hi) == len(self.points) == p) or p == 0:
            raise ValueError("grid: names, lo, hi and points must have one entry per parameter")
        for n, a, b, k in zip(self.names, self.lo, self.hi, self.points, strict=True):
            if not (math.isfinite(a) and math.isfinite(b) and a < b):
                raise ValueError(f"prior.{n}: the box must be [lo, hi] with lo < hi, got [{a}, {b}]")
            if int(k) != k or k < 3:
                raise ValueError(f"grid.points for {n} must be an integer >= 3, got {k!r}")

    @property
    def axes(self) -> list[np.ndarray]:
        return [np.linspace(a, b, int(k)) for a, b, k in zip(self.lo, self.hi, self.points, strict=True)]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.points)

    def nodes(self) -> np.ndarray:
        """All nodes [G, P], the first parameter varying slowest."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def weights(self) -> np.ndarray:
        """Trapezoid quadrature weights ``[*shape]`` (sum = box volume)."""
        w = np.ones(self.shape)
        for d, ax in enumerate(self.axes):
            wd = np.full(ax.size, ax[1] - ax[0])
            wd[0] = wd[-1] = 0.5 * (ax[1] - ax[0])
            shape = [1] * len(self.shape)
            shape[d] = ax.size
            w = w * wd.reshape(shape)
        return w


def refine_loglike(grid: ParameterGrid, log_like: np.ndarray, factor: int) -> tuple[ParameterGrid, np.ndarray]:
    """Cubic-spline interpolation of log-likelihoods ``[M, G]`` (nats, on ``grid``) onto the grid with ``factor``
    times the cells per axis: ``(fine grid, [M, G_fine])``. ``factor = 1`` returns the input.

    The spline runs through the log-likelihood, not the density: log L is close to quadratic over a few cells, so
    the spline is accurate where the density itself (exp of a change of several units per cell) is not.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"refine must be an integer >= 1, got {factor!r}")
    ll = np.asarray(log_like, dtype=np.float64).reshape(-1, int(np.prod(grid.shape)))
    if factor == 1:
        return grid, ll
    if min(grid.shape) < 4:
        raise ValueError(f"refine > 1 needs at least 4 grid points per parameter (cubic spline), got {grid.shape}")
    finite = np.isfinite(ll)
    floor = np.where(finite, ll, np.inf).min(axis=1, keepdims=True) - 50.0  # far below the peak: no mass
    ll = np.where(finite, ll, floor)
    fine = ParameterGrid(grid.names, grid.lo, grid.hi, tuple((k - 1) * int(factor) + 1 for k in grid.points))
    values = np.moveaxis(ll.reshape(-1, *grid.shape), 0, -1)  # [*shape, M]
    interp = RegularGridInterpolator(grid.axes, values, method="cubic")
    return fine, np.ascontiguousarray(interp(fine.nodes()).T)


class GridPosterior:
    """The posterior of one map (or one joint set) from its log-likelihood on a :class:`ParameterGrid`.

    Args:
        grid: the grid (its box is the uniform prior's support).
        log_like: log-likelihood ``[*grid.shape]``, nats (any additive constant).
    """

    def __init__(self, grid: ParameterGrid, log_like: np.ndarray) -> None:
        ll = np.asarray(log_like, dtype=np.float64).reshape(grid.shape)
        if not np.isfinite(ll).any():
            raise ValueError("log-likelihood is not finite anywhere on the grid")
        self.grid = grid
        dens = np.exp(np.where(np.isfinite(ll), ll - np.nanmax(ll[np.isfinite(ll)]), -np.inf))
        self._w = grid.weights()
        self.density = dens / float((dens * self._w).sum())  # per unit parameter volume
        self._mass = self.density * self._w

    def mean(self) -> np.ndarray:
        """Posterior mean [P]."""
        nodes = self.grid.nodes()
        return (self._mass.reshape(-1, 1) * nodes).sum(axis=0)

    def cov(self) -> np.ndarray:
        """Posterior covariance [P, P]."""
        nodes = self.grid.nodes() - self.mean()
        m = self._mass.reshape(-1)
        return np.einsum("g,gi,gj->ij", m, nodes, nodes)

    def marginal(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """The marginal density of parameter ``axis`` on its grid axis."""
        other = tuple(i for i in range(len(self.grid.shape)) if i != axis)
        m = self._mass.sum(axis=other)
        ax = self.grid.axes[axis]
        return ax, m / np.trapezoid(m, ax)

    def interval(self, axis: int, level: float) -> tuple[float, float]:
        """Equal-tailed marginal credible interval of parameter ``axis`` at ``level`` (e.g. 0.68)."""
        ax, dens = self.marginal(axis)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(ax))])
        cdf /= cdf[-1]
        lo, hi = 0.5 * (1 - level), 0.5 * (1 + level)
        return float(np.interp(lo, cdf, ax)), float(np.interp(hi, cdf, ax))

    def credibility(self, point: Sequence[float]) -> float:
        """Posterior mass of the highest-density region whose edge passes through ``point``.

        The truth lies inside the HPD credible region of level q exactly when this is <= q, so over many maps
        with known truths its distribution is uniform for a calibrated posterior (coverage).
        """
        interp = RegularGridInterpolator(self.grid.axes, self.density, bounds_error=False, fill_value=0.0)
        at = float(interp(np.asarray(point, dtype=np.float64)[None])[0])
        return float(self._mass[self.density > at].sum())

    def figure_of_merit(self) -> float:
        """1 / sqrt(det cov): larger is tighter (for two parameters, ∝ 1/area of the credible ellipse)."""
        det = float(np.linalg.det(self.cov()))
        return 1.0 / math.sqrt(det) if det > 0 else float("inf")

    def summary(self) -> dict[str, object]:
        """Mean, covariance, 68 % / 95 % marginal intervals and the FoM, as plain lists."""
        p = len(self.grid.names)
        return {
            "mean": self.mean().tolist(),
            "cov": self.cov().tolist(),
            "interval68": [list(self.interval(i, 0.68)) for i in range(p)],
            "interval95": [list(self.interval(i, 0.95)) for i in range(p)],
            "fom": self.figure_of_merit(),
        }
