"""Figures of a validation: statistics, correlation matrices, sample maps, nearest-neighbour distances.

Matplotlib's object API only (``Figure``, never pyplot), so drawing sets no global state and works
under any backend; margins are fixed in inches (a layout engine would triple the drawing time). Every
function takes arrays or result dicts (numpy or JSON form) and returns a ``Figure``;
:func:`save_figure` writes one with the umask's file mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.atomic import atomic_path

__all__ = [
    "draw_validation_figures",
    "feature_groups",
    "figure",
    "figure_file_name",
    "plot_correlation",
    "plot_nearest_neighbour",
    "plot_sample_maps",
    "plot_statistic",
    "save_figure",
]

_XLABEL = {
    "cl": r"$\ell$",
    "peaks": r"$\nu$",
    "minima": r"$\nu$",
    "pdf": r"$\nu$",
    "v0": r"$\nu$",
    "v1": r"$\nu$",
    "v2": r"$\nu$",
    "moments": "moment",
}
_YLABEL = {
    "cl": r"$\ell(\ell+1)C_\ell/2\pi$",
    "peaks": "peaks per map",
    "minima": "minima per map",
    "pdf": "PDF",
    "v0": r"$V_0$",
    "v1": r"$V_1$ [arcmin$^{-1}$]",
    "v2": r"$V_2$ [arcmin$^{-2}$]",
    "moments": "value / reference σ",
}
_MOMENT_NAMES = ["mean", "var", "skew", "kurt"]


def figure(
    w: float,
    h: float,
    *,
    left: float = 0.8,
    right: float = 0.2,
    bottom: float = 0.55,
    top: float = 0.4,
    hspace: float = 0.1,
    wspace: float = 0.35,
) -> Any:
    """A ``Figure`` of ``w`` × ``h`` inches with fixed margins in inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, hspace=hspace, wspace=wspace
    )
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> str:
    """Write ``fig`` as PNG to ``path`` (atomically, mode 0666 & ~umask); returns the file name."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path.name


def figure_file_name(prefix: str, name: str) -> str:
    """``<prefix>_<name>.png`` with characters outside ``[A-Za-z0-9_.-]`` replaced (``peaks@2.0arcmin``)."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"


def feature_groups(name: str, channels: int, cross: bool = True) -> list[str]:
    """Labels of the channel (or channel-pair) blocks that the features of a statistic come in
    (:func:`lensflow.stats.summarize` is channel-major; ``cl`` with ``cross`` holds channel pairs)."""
    if name == "cl" and cross and channels > 1:
        return [f"({i},{j})" for i in range(channels) for j in range(i, channels)]
    if channels > 1:
        return [f"channel {i}" for i in range(channels)]
    return [""]


# ---------------------------------------------------------------------------------------------------
# One statistic: mean ± σ, ratio, significance
# ---------------------------------------------------------------------------------------------------


def _floats(result: Mapping[str, Any] | None, key: str) -> np.ndarray | None:
    """A flat float array of ``result[key]`` (JSON ``None`` → NaN), or ``None`` when absent."""
    if result is None or key not in result:
        return None
    return np.asarray([np.nan if v is None else v for v in np.ravel(result[key])], dtype=float)


def _mean_panel(ax: Any, base: str, xx: np.ndarray, ref: np.ndarray, cand: np.ndarray | None, labels: Any) -> None:
    """Reference mean ± σ as a band and candidate mean ± σ as points (× ℓ(ℓ+1)/2π for C_ℓ)."""
    from matplotlib.ticker import NullFormatter

    mr, sr = ref.mean(0), ref.std(0, ddof=1)
    w = xx * (xx + 1) / (2 * np.pi) if base == "cl" else np.ones_like(xx)
    if base == "moments":
        # mean, variance, skewness and kurtosis differ by orders of magnitude: show each in units of
        # its reference scatter
        w = 1.0 / np.where(sr > 0, sr, 1.0)
    ax.fill_between(xx, (mr - sr) * w, (mr + sr) * w, color="C0", alpha=0.25, lw=0)
    ax.plot(xx, mr * w, "-", color="C0", label=f"{labels[0]} (N={ref.shape[0]})")
    if cand is not None:
        mc, sc = cand.mean(0), cand.std(0, ddof=1)
        label = f"{labels[1]} (N={cand.shape[0]})"
        ax.errorbar(xx, mc * w, yerr=sc * w, fmt="o", ms=3, color="C3", capsize=2, lw=1, label=label)
    if base == "cl":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow panels
    if base in ("cl", "pdf") and np.all(mr * w > 0):
        ax.set_yscale("log")
    if base == "moments":
        ax.set_xticks(xx, _MOMENT_NAMES[: len(xx)])


def _ratio_panel(ax: Any, xx: np.ndarray, ref: np.ndarray, cand: np.ndarray, allowed: np.ndarray | None) -> None:
    """Ratio of the means, only where the reference mean stands out of its scatter, with the allowed band."""
    mr, sr, mc = ref.mean(0), ref.std(0, ddof=1), cand.mean(0)
    ok = (np.abs(mr) > 0.25 * sr) & (mr != 0)  # a ratio near a zero crossing is noise
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, mc / mr, np.nan)
        if allowed is not None:
            band = np.where(ok, allowed / np.abs(mr), np.nan)
            ax.fill_between(xx, 1 - band, 1 + band, color="0.85", lw=0, label="allowed")
    ax.axhline(1, color="k", lw=0.6)
    ax.plot(xx, ratio, "o-", ms=3, color="C3", lw=1)
    fin = np.abs(ratio[np.isfinite(ratio)] - 1)
    lim = float(np.clip(1.3 * (fin.max() if fin.size else 0.1), 0.05, 1.0))
    ax.set_ylim(1 - lim, 1 + lim)


def _z_panel(
    ax: Any,
    xx: np.ndarray,
    ref: np.ndarray,
    cand: np.ndarray,
    z: np.ndarray | None,
    zthr: float | None,
    bad: np.ndarray,
) -> None:
    """Mean difference in standard errors, the per-bin threshold as a band, failing bins as red crosses."""
    if z is None:
        se = np.sqrt(ref.var(0, ddof=1) / ref.shape[0] + cand.var(0, ddof=1) / cand.shape[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (cand.mean(0) - ref.mean(0)) / se
    if zthr is not None:
        ax.axhspan(-zthr, zthr, color="0.85", lw=0)
    ax.axhline(0, color="k", lw=0.6)
    zz = np.clip(np.nan_to_num(z, nan=0.0, posinf=99, neginf=-99), -99, 99)
    ax.plot(xx[~bad], zz[~bad], "o", ms=3, color="C2")
    ax.plot(xx[bad], zz[bad], "x", ms=5, color="red", label="fails")


def plot_statistic(
    name: str,
    x: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray | None = None,
    result: Mapping[str, Any] | None = None,
    groups: Sequence[str] = ("",),
    units: str = "nu",
    labels: tuple[str, str] = ("reference", "candidate"),
) -> Any:
    """Mean ± σ of one statistic for one or two sets [N, F], with ratio and significance panels.

    ``result`` (a :func:`lensflow.compare.compare_statistic` result, JSON or numpy form) adds the
    allowed band to the ratio panel, the per-bin threshold to the z panel and marks failing bins.
    ``groups`` labels the channel blocks of the features (:func:`feature_groups`). Returns a ``Figure``.
    """
    base = name.split("@", 1)[0]
    ref = np.asarray(reference, dtype=float)
    cand = None if candidate is None else np.asarray(candidate, dtype=float)
    ng = len(groups)
    nb = ref.shape[1] // ng
    rows = 1 if cand is None else 3
    fig = figure(3.6 * ng + 1.0, 2.6 + (2.2 if cand is not None else 0.0), left=0.95, hspace=0.12)
    axes = fig.subplots(rows, ng, squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1, 1.2][:rows]})
    allowed, z = _floats(result, "mean_allowed"), _floats(result, "z_mean")
    passed = None if result is None else result.get("mean_pass_bins")
    zthr = None if result is None else result.get("mean_sigma_per_bin")
    kappa = units == "kappa" and base not in ("cl", "moments")
    xlab = r"$\kappa$" if kappa else _XLABEL.get(base, "bin")
    for g in range(ng):
        sl = slice(g * nb, (g + 1) * nb)
        xx = np.asarray(x[sl], dtype=float)
        ax = axes[0, g]
        _mean_panel(ax, base, xx, ref[:, sl], None if cand is None else cand[:, sl], labels)
        ax.set_title(f"{name} {groups[g]}".strip(), fontsize=9)
        if g == 0:
            ax.set_ylabel(_YLABEL.get(base, name))
            ax.legend(fontsize=7)
        if cand is None:
            ax.set_xlabel(xlab)
            continue
        _ratio_panel(axes[1, g], xx, ref[:, sl], cand[:, sl], None if allowed is None else allowed[sl])
        bad = np.zeros(nb, bool) if passed is None else ~np.asarray(passed, dtype=bool)[sl]
        _z_panel(axes[2, g], xx, ref[:, sl], cand[:, sl], None if z is None else z[sl], zthr, bad)
        if g == 0:
            axes[1, g].set_ylabel("ratio", fontsize=8)
            axes[2, g].set_ylabel(r"$\Delta\mu$ / SE", fontsize=8)
        axes[2, g].set_xlabel(xlab)
    return fig


# ---------------------------------------------------------------------------------------------------
# Correlations, maps, distances
# ---------------------------------------------------------------------------------------------------


def plot_correlation(
    name: str,
    corr_reference: np.ndarray,
    corr_candidate: np.ndarray | None = None,
    corr: Mapping[str, Any] | None = None,
) -> Any:
    """Correlation matrices of one statistic side by side (reference, candidate, difference)."""
    from matplotlib.ticker import MaxNLocator

    cr = np.asarray(corr_reference, dtype=float)
    panels = [("reference", cr)]
    if corr_candidate is not None:
        cc = np.asarray(corr_candidate, dtype=float)
        panels += [("candidate", cc), ("candidate − reference", cc - cr)]
    fig = figure(3.6 * len(panels) + 0.6, 3.4, left=0.6, top=0.55, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, m) in zip(axes, panels, strict=True):
        diff = title.startswith("candidate −")
        im = ax.imshow(m, cmap="RdBu_r", vmin=-0.5 if diff else -1, vmax=0.5 if diff else 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("bin")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("bin")
    sup = name
    if corr is not None and corr.get("rms") is not None:
        sup += (
            f": rms error {corr['rms']:.3f} (noise floor {corr['noise_floor']:.3f}, allowed "
            f"{corr.get('tolerance', float('nan')):.3f}), max {corr['max']:.3f}"
        )
    fig.suptitle(sup, fontsize=9)
    return fig


def plot_sample_maps(
    reference: np.ndarray,
    candidate: np.ndarray | None = None,
    pixel_arcmin: float = 1.0,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> Any:
    """Maps [n, C, H, W] (channel 0) of one or two sets on ONE colour scale (0.5–99.5 % of all pixels)."""
    sets = [(labels[0], np.asarray(reference))]
    if candidate is not None:
        sets.append((labels[1], np.asarray(candidate)))
    n = max(s[1].shape[0] for s in sets)
    allpix = np.concatenate([s[1][:, 0].ravel() for s in sets])
    vmin, vmax = np.percentile(allpix, [0.5, 99.5])
    fig = figure(2.2 * n + 1.6, 2.3 * len(sets), left=0.4, right=1.2, bottom=0.15, top=0.4, wspace=0.05, hspace=0.05)
    axes = fig.subplots(len(sets), n, squeeze=False)
    side = reference.shape[-1] * pixel_arcmin / 60.0
    im = None
    for r, (lab, maps) in enumerate(sets):
        for i in range(n):
            ax = axes[r, i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= maps.shape[0]:
                ax.set_axis_off()
                continue
            extent = (0, side, 0, side)
            im = ax.imshow(
                maps[i, 0], cmap="magma", vmin=vmin, vmax=vmax, origin="lower", extent=extent, interpolation="nearest"
            )
            if i == 0:
                ax.set_ylabel(lab)
    cax = fig.add_axes((1 - 1.0 / fig.get_figwidth(), 0.15, 0.15 / fig.get_figwidth(), 0.7))
    fig.colorbar(im, cax=cax, label=r"$\kappa$")
    fig.suptitle(f"{side:.2f} deg maps, channel 0, one colour scale", fontsize=9)
    return fig


def plot_nearest_neighbour(mem: Mapping[str, Any]) -> Any:
    """Histogram of nearest-neighbour distances to the training maps: candidates vs held-out maps."""
    dc = np.asarray(mem["candidate_distances"], dtype=float)
    dh = np.asarray(mem["heldout_distances"], dtype=float)
    fig = figure(6.0, 3.6, top=0.45)
    ax = fig.subplots()
    hi = max(dc.max(initial=0), dh.max(initial=0)) * 1.05 or 1.0
    edges = np.linspace(0, hi, 41)
    ax.hist(dh, edges, histtype="stepfilled", alpha=0.4, color="C0", label=f"held-out (N={dh.size})")
    ax.hist(dc, edges, histtype="step", lw=1.5, color="C3", label=f"candidate (N={dc.size})")
    ax.axvline(mem["near_threshold"], color="k", ls="--", lw=1, label="near-copy threshold")
    ax.set_xlabel(r"L2 distance to the nearest training map [$\kappa$]")
    ax.set_ylabel("maps")
    ax.legend(fontsize=8)
    ax.set_title(
        f"memorisation: near copies {mem['near_fraction_candidate']:.1%} (held-out "
        f"{mem['near_fraction_heldout']:.1%}), median ratio {mem['median_ratio']:.2f}, "
        f"MW p={mem['mannwhitney_pvalue']:.1e}",
        fontsize=8,
    )
    return fig


def draw_validation_figures(
    folder: str | os.PathLike,
    result: Mapping[str, Any],
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    bins: Mapping[str, np.ndarray],
    *,
    channels: int,
    cross: bool,
    units: str,
    pixel_arcmin: float,
    samples: tuple[np.ndarray, np.ndarray] | None,
    memorization: Mapping[str, Any] | None,
    dpi: int,
) -> dict[str, Any]:
    """Every PNG of a validation report into ``folder``; returns their file names as ``summary.json`` lists them.

    ``stat_<name>.png`` per statistic of the :func:`lensflow.compare.compare` ``result``,
    ``corr_<name>.png`` where a correlation error was measured, ``sample_maps.png`` (``samples`` =
    reference and candidate maps) and ``nearest_neighbour.png`` (a completed memorisation check).
    """
    folder = Path(folder)
    names: dict[str, Any] = {"statistics": {}, "correlations": {}}
    for name, r in result["statistics"].items():
        groups = feature_groups(name, channels, cross)
        fig = plot_statistic(name, bins[name], reference[name], candidate[name], r, groups, units)
        names["statistics"][name] = save_figure(fig, folder / figure_file_name("stat", name), dpi)
        corr = r["corr"]
        if corr["rms"] is not None:
            fig = plot_correlation(name, corr["corr_reference"], corr["corr_candidate"], corr)
            names["correlations"][name] = save_figure(fig, folder / figure_file_name("corr", name), dpi)
    if samples is not None:
        fig = plot_sample_maps(*samples, pixel_arcmin=pixel_arcmin)
        names["sample_maps"] = save_figure(fig, folder / "sample_maps.png", dpi)
    if memorization is not None and memorization.get("status") == "done":
        names["nearest_neighbour"] = save_figure(
            plot_nearest_neighbour(memorization), folder / "nearest_neighbour.png", dpi
        )
    return names
