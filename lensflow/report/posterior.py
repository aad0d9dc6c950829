"""Figures and the HTML page of ``python -m lensflow.infer``: corner plots of grid posteriors and the summary table."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lensflow.report.figures import figure
from lensflow.report.html import CSS

__all__ = ["corner_figure", "posterior_page"]

_COLOURS = {"emulator": "C0", "exact": "k", "cl": "C3"}
_LABELS = {"Omega_m": r"$\Omega_m$", "sigma_8": r"$\sigma_8$"}


def _levels(density: np.ndarray, masses: Sequence[float]) -> list[float]:
    """Density thresholds enclosing ``masses`` of the (cell-weighted) posterior, highest density first."""
    flat = np.sort(density.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = sorted(float(flat[min(np.searchsorted(cum, m), flat.size - 1)]) for m in masses)
    # a posterior narrower than a grid cell puts both masses in one cell: contour needs increasing levels
    return [lv for i, lv in enumerate(levels) if i == 0 or lv > levels[i - 1]]


def corner_figure(
    axes: Sequence[np.ndarray],
    names: Sequence[str],
    densities: Mapping[str, np.ndarray],
    truth: Sequence[float] | None = None,
    title: str = "",
) -> Any:
    """A corner plot of 2-D grid posteriors (68 % and 95 % HPD contours) and their 1-D marginals.

    Args:
        axes: the grid axes [G1], [G2].
        names: the two parameter names.
        densities: {label: density [G1, G2]} (``emulator``, ``exact``, ``cl`` get fixed colours).
        truth: the true parameters, drawn as lines.
        title: figure title.
    """
    if len(axes) != 2:
        raise ValueError("corner_figure draws two parameters")
    fig = figure(5.2, 5.0, left=0.8, bottom=0.7, top=0.45, wspace=0.08, hspace=0.08)
    gs = fig.add_gridspec(2, 2)
    ax_x, ax_y, ax_2d = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 1]), fig.add_subplot(gs[1, 0])
    x, y = axes
    for label, dens in densities.items():
        colour = _COLOURS.get(label, None)
        d = np.asarray(dens, dtype=float)
        if d.sum() <= 0:
            continue
        levels = _levels(d, (0.95, 0.68))
        ax_2d.contour(x, y, d.T, levels=levels, colors=[colour], linewidths=(0.8, 1.6)[-len(levels) :])
        mx, my = d.sum(axis=1), d.sum(axis=0)
        ax_x.plot(x, mx / np.trapezoid(mx, x), color=colour, label=label)
        ax_y.plot(my / np.trapezoid(my, y), y, color=colour)
    if truth is not None:
        for ax in (ax_2d, ax_x):
            ax.axvline(truth[0], color="0.5", ls=":", lw=1)
        ax_2d.axhline(truth[1], color="0.5", ls=":", lw=1)
        ax_y.axhline(truth[1], color="0.5", ls=":", lw=1)
    ax_2d.set_xlabel(_LABELS.get(names[0], names[0]))
    ax_2d.set_ylabel(_LABELS.get(names[1], names[1]))
    ax_x.set_xlim(x[0], x[-1])
    ax_y.set_ylim(y[0], y[-1])
    ax_2d.set_xlim(x[0], x[-1])
    ax_2d.set_ylim(y[0], y[-1])
    ax_x.set_xticklabels([])
    ax_x.set_yticks([])
    ax_y.set_xticks([])
    ax_y.set_yticklabels([])
    ax_x.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.05, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(u) for u in v)
    return html.escape(str(v))


def posterior_page(summary: Mapping[str, Any], images: Sequence[str]) -> str:
    """The self-contained page of an ``infer`` run: the aggregate table, the per-map table, the corner plots."""
    agg = summary.get("aggregate", {})
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_cell(v)}</td></tr>" for k, v in agg.items())
    per_map = []
    for m in summary.get("maps", [])[:200]:
        emu, ex = m.get("emulator", {}), m.get("exact") or {}
        per_map.append(
            f"<tr><td>{m['index']}</td><td>{_cell(m.get('truth'))}</td><td>{_cell(emu.get('mean'))}</td>"
            f"<td>{_cell(ex.get('mean'))}</td><td>{_cell(m.get('shift_sigma'))}</td>"
            f"<td>{_cell(m.get('width_ratio'))}</td><td>{_cell(m.get('fom_ratio_field_cl'))}</td></tr>"
        )
    head = "<tr><th>map</th><th>truth</th><th>emulator mean</th><th>exact mean</th><th>shift [σ_exact]</th>"
    head += "<th>width ratio</th><th>FoM field / C_ℓ</th></tr>"
    imgs = "".join(f"<p><img src='{html.escape(i)}'></p>" for i in images)
    cfg = html.escape(json.dumps(summary.get("config", {}), indent=1))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lensflow infer</title><style>{CSS}</style></head>"
        f"<body><h2>Posterior of {html.escape(', '.join(summary.get('param_names', [])))}</h2>"
        f"<p>prior box {html.escape(json.dumps(summary.get('prior')))}; {len(summary.get('maps', []))} maps</p>"
        f"<h3>Aggregate</h3><table>{rows}</table><h3>Per map</h3><table>{head}{''.join(per_map)}</table>"
        f"<h3>Corner plots</h3>{imgs}<details><summary>config</summary><pre>{cfg}</pre></details></body></html>"
    )
