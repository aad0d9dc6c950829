"""Figures of training's sample check (:mod:`lensflow.training.sample_check`): a grid of maps and the statistics
of samples against validation maps.

Matplotlib's object API (no pyplot, no global state) with fixed margins: ``tight_layout`` costs seconds per
figure, which adds up over the checks of a long run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lensflow.mapstore import StoreMeta

__all__ = ["check_figures"]

_LABELS = {"cl": (r"$\ell$", r"$\ell(\ell+1)C_\ell/2\pi$"), "peaks": ("ν", "peaks per map"), "pdf": ("ν", "PDF")}


def _blocks(x: np.ndarray) -> int:
    """Channel blocks of a statistic's columns (the bin centres repeat once per block)."""
    drops = np.flatnonzero(np.diff(x) <= 0)
    return x.size // (int(drops[0]) + 1) if drops.size else 1


def _maps_figure(ref: np.ndarray, samples: np.ndarray, meta: StoreMeta, tag: str) -> Any:
    from matplotlib.figure import Figure

    k = min(6, ref.shape[0], samples.shape[0])
    lo, hi = np.quantile(ref[:k, 0], [0.005, 0.995])
    fig = Figure(figsize=(2.0 * k, 4.3))
    axes = fig.subplots(2, k, squeeze=False)
    for j in range(k):
        for r, (arr, name) in enumerate(((ref, "validation"), (samples, "Glow sample"))):
            ax = axes[r, j]
            ax.imshow(arr[j, 0], origin="lower", cmap="inferno", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    side = ref.shape[-1] * meta.pixel_arcmin / 60.0
    fig.suptitle(f"κ maps ({side:.2f}° side, channel 0), {tag}")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=0.9, wspace=0.05, hspace=0.05)
    return fig


def _stats_figure(bins: Mapping[str, Mapping[str, Any]], tag: str) -> Any:
    from matplotlib.figure import Figure

    names = list(bins)
    fig = Figure(figsize=(4.4 * len(names), 6))
    axes = fig.subplots(2, len(names), sharex="col", gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for col, key in enumerate(names):
        b = bins[key]
        x, r, s = (np.asarray(b[k], float) for k in ("x", "reference", "sample"))
        m = _blocks(x)
        w = x * (x + 1) / (2 * np.pi) if key == "cl" else np.ones_like(x)
        for i, sl in enumerate(np.array_split(np.arange(x.size), m)):
            axes[0, col].plot(x[sl], w[sl] * r[sl], "k-", label="validation" if i == 0 else None)
            axes[0, col].plot(x[sl], w[sl] * s[sl], "C1--", label="Glow" if i == 0 else None)
            axes[1, col].plot(x[sl], np.asarray(b["frac"], float)[sl], "C1-")
        if key == "cl":
            axes[0, col].set_xscale("log")
            axes[0, col].set_yscale("log")
        elif np.all(r > 0):
            axes[0, col].set_yscale("log")
        xlabel, ylabel = _LABELS.get(key, ("bin", key))
        axes[0, col].set_ylabel(f"{ylabel} ({b['name']})")
        axes[1, col].set_xlabel(xlabel)
        axes[1, col].axhline(0, color="k", lw=0.5)
        axes[1, col].set_ylim(-0.5, 0.5)
    axes[1, 0].set_ylabel("fractional error")
    axes[0, 0].legend()
    fig.suptitle(f"Glow samples vs validation maps, {tag}")
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.08, top=0.93, wspace=0.28, hspace=0.06)
    return fig


def check_figures(
    ref: np.ndarray, samples: np.ndarray, bins: Mapping[str, Any], meta: StoreMeta, out: Path, tag: str
) -> dict[str, str]:
    """Write ``<tag>_maps.png`` and ``<tag>_stats.png`` into ``out``; returns ``{"maps": path, "stats": path}``."""
    from lensflow._util.atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    figs = {"maps": _maps_figure(ref, samples, meta, tag), "stats": _stats_figure(bins, tag)}
    paths = {}
    for name, fig in figs.items():
        path = out / f"{tag}_{name}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
        paths[name] = str(path)
    return paths
