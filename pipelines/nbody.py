"""What the Glow adds on N-body maps: the Gaussian part alone against the whole model, plus the simulator's checks.

    python pipelines/nbody.py gaussian-part --ckpt <best.ckpt> --n 4000 --out runs/nbody/gaussian_part.h5
    python pipelines/nbody.py bits --ckpt <best.ckpt> --maps runs/nbody/heldout.h5 --n 2000 --out runs/nbody/bits.json
    python pipelines/nbody.py sims --train <training store> --heldout runs/nbody/heldout.h5 --out runs/nbody/sims.json
    python pipelines/nbody.py halves --store runs/nbody/heldout.h5 --out-even runs/nbody/a.h5 --out-odd runs/nbody/b.h5
    python pipelines/nbody.py spread --ckpt <best.ckpt> --train <training store> --heldout runs/nbody/heldout.h5 \
        --out runs/nbody/spread.json
    python pipelines/nbody.py moments --validate runs/nbody/validate_mocks runs/nbody/validate_sims \
        --out runs/nbody/moments.json
    python pipelines/nbody.py radii --ckpt <best.ckpt> --maps runs/nbody/heldout.h5 --n 2000 --out runs/nbody/radii.json
    python pipelines/nbody.py bands --ckpt <best.ckpt> --maps runs/nbody/heldout.h5 --mocks runs/nbody/mocks.h5 \
        --n 2000 --out runs/nbody/bands.json

``gaussian-part``: ``n`` mocks drawn through the checkpoint's preprocessing (the fitted shifted log) and its crop
Gaussian alone, with standard-normal latents (no Glow), into a mock store that ``lensflow.validate`` reads.
``bits``: held-out bits/pixel (``−log₂ p / pixels``, mean and SE over ``n`` maps) of the Gaussian part alone and of
the whole model, paired on the same maps; their difference is what the Glow learned, no exact likelihood needed.
``sims``: the simulator's own figures on the stores: the mean C_ℓ against pyccl's halofit Limber C_ℓ, the
rank-Gaussianized peak test (:mod:`lensflow.compare.gaussianity`), and how independent maps that share a box are
(``1 + (K−1)ρ̄``: the variance of a box's K-map mean over that of K independent maps, per statistic bin).
``halves``: the store's even and odd boxes as two stores, for the simulations-against-simulations control.
``spread``: why the mocks' small-scale spread is too wide. The Gaussian part refitted on training maps with the
shifted log's λ at 1, 1.5, 2, 3 and 5 times its maximum-likelihood value, and as a Gaussian copula (the pixel PDF
mapped to a normal by its empirical quantiles, so the one-point PDF is exact): per set, the map-to-map std of
log C_ℓ in the three highest ℓ bins and the mean and std of the per-map skewness, against the held-out maps.
``moments``: why the per-map moments' correlation matrix fails. From ``validate`` output folders (their stats.h5),
each set's correlation of the per-map variance with the skewness and with the excess kurtosis (a massive halo raises
all three), with box-bootstrap standard errors where the set's store records boxes, and the mean within one box.
``radii``: are the model's latents whitened on held-out maps as a whole, level by level? Per latent (finest split
first, top last), the std of ``|z|²/D`` over maps against a χ² variable's ``sqrt(2/D)``, and the correlation matrix of
the latents' log radii across levels (0 under the model): a map whose power at every scale moves together shows as
over-dispersed, correlated radii (what ``model.amplitude_levels`` couples).
``bands``: where the mocks' excess small-scale spread comes from. Per set (held-out maps, mocks), each map's log
C_ℓ in three ℓ bands, (100, 500], (1300, 2000] and (2300, ℓ_Nyquist], their map-to-map std and
correlations, and the finest latent's log radius: its std against a χ variable's, its correlation with the top band,
and the top band's std once the part the radius explains (linear regression) is removed. In the mocks the radius is
χ-distributed by construction; what the rest of the model puts in the top band is the remainder.
``pipelines/nbody.sh`` runs the whole sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

# this folder's script (the script's own directory is on sys.path): the Gaussian part alone, sampled and scored
from cond_gaussian_part import gaussian_part_log_prob, gaussian_part_sample

from lensflow._util.atomic import write_json
from lensflow.mapstore import MapStoreWriter, StoreMeta, open_store, write_store
from lensflow.model import KappaFlow
from lensflow.provenance import provenance
from lensflow.stats import power_spectrum


def cmd_gaussian_part(a: argparse.Namespace) -> None:
    model = KappaFlow.load(a.ckpt)
    maps = gaussian_part_sample(model, a.n, None, a.seed)
    meta = StoreMeta(
        pixel_arcmin=model.meta.pixel_arcmin,
        source_redshifts=model.meta.source_redshifts,
        periodic=model.meta.periodic,
        kind="mock",
        created_by=provenance({"ckpt": a.ckpt, "n": a.n, "seed": a.seed, "what": "gaussian part alone"}),
    )
    with MapStoreWriter(a.out, meta, npix=model.npix, overwrite=True, fractions=(0.0, 0.0, 1.0)) as w:
        w.append(maps)
    print(f"wrote {a.n} Gaussian-part maps to {a.out}")


def _scored_maps(a: argparse.Namespace) -> tuple[Any, np.ndarray]:
    """The store of ``--maps`` and a seeded random subset of at most ``--n`` of its ``--split`` maps (sorted)."""
    st = open_store(a.maps)
    pool = st.indices(a.split)
    return st, np.sort(np.random.default_rng(a.seed).choice(pool, min(a.n, pool.size), replace=False))


def cmd_bits(a: argparse.Namespace) -> None:
    model = KappaFlow.load(a.ckpt)
    st, idx = _scored_maps(a)
    gp, full = [], []
    for lo in range(0, idx.size, 250):
        maps = st.read(idx[lo : lo + 250])
        gp.append(gaussian_part_log_prob(model, maps, None))
        x = torch.as_tensor(maps)
        with torch.no_grad():
            full.append(model.log_prob(x).double().numpy())
    gp, full = np.concatenate(gp), np.concatenate(full)
    d = model.num_dims * math.log(2)
    rows = {}
    for name, lp in (("gaussian_part", gp), ("whole_model", full), ("glow_gain", full - gp)):
        v = -lp / d if name != "glow_gain" else lp / d
        rows[name] = {"bits_per_pixel": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(v.size))}
    rows["n_maps"] = int(idx.size)
    write_json(a.out, rows, indent=2)
    print(rows)


def _box_inflation(stat: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Per bin, Var(box mean) · K / Var(map): 1 for independent maps, 1 + (K − 1) ρ̄ with correlation ρ̄ in a box."""
    boxes = np.unique(box)
    k = np.array([(box == b).sum() for b in boxes])
    means = np.stack([stat[box == b].mean(0) for b in boxes])
    within = np.mean([stat[box == b].var(0, ddof=1) for b in boxes], axis=0)
    return means.var(0, ddof=1) * k.mean() / within


def cmd_sims(a: argparse.Namespace) -> None:
    from lensflow.compare.gaussianity import peak_excess
    from lensflow.sims.theory import convergence_cl
    from lensflow.stats import peak_counts, power_spectrum
    from lensflow.stats.spectra import default_ell_edges

    out: dict = {}
    ho = open_store(a.heldout)
    maps = ho.read()
    meta = ho.meta
    pix = meta.pixel_arcmin
    edges = default_ell_edges(ho.npix, pix, 12)
    ell, cl = power_spectrum(maps, pix, edges)
    cl = np.asarray(cl)[:, 0]
    th = convergence_cl(np.asarray(ell), meta.extra["cosmology"], meta.extra["z_source"])
    box = ho.read_realization()
    box_means = np.stack([cl[box == b].mean(0) for b in np.unique(box)])
    out["cl_over_halofit"] = {
        "ell": np.asarray(ell).tolist(),
        "ratio": (cl.mean(0) / th).tolist(),
        "se_between_boxes": (box_means.std(0, ddof=1) / math.sqrt(len(box_means)) / th).tolist(),
        "n_maps": int(len(cl)),
        "n_boxes": int(len(box_means)),
    }
    pe = peak_excess(maps, seed=a.seed)
    out["rank_gaussianized_peaks"] = {k: np.asarray(v).tolist() for k, v in pe.items()}
    out["rank_gaussianized_peaks"]["n_maps"] = int(len(maps))
    tr = open_store(a.train)
    tmaps = tr.read()
    tbox = tr.read_realization()
    _, tcl = power_spectrum(tmaps, pix, edges)
    sig = maps.std()
    peaks = np.asarray(peak_counts(tmaps, np.linspace(-2, 6, 9) * sig, border=1), float).reshape(len(tmaps), -1)
    out["box_inflation"] = {
        "what": "Var(mean of a box's K maps) * K / Var(one map), per bin; 1 = independent maps",
        "maps_per_box": float(np.mean([(tbox == b).sum() for b in np.unique(tbox)])),
        "n_boxes": int(len(np.unique(tbox))),
        "cl": _box_inflation(np.asarray(tcl)[:, 0], tbox).tolist(),
        "peaks": _box_inflation(peaks, tbox).tolist(),
    }
    write_json(a.out, out, indent=2)
    print(out["cl_over_halofit"], out["rank_gaussianized_peaks"]["max_abs_z"], out["box_inflation"])


def _spread_summary(maps: np.ndarray, pix: float) -> dict:
    from lensflow.stats import power_spectrum
    from lensflow.stats.spectra import default_ell_edges

    ell, cl = power_spectrum(maps.astype(np.float32), pix, default_ell_edges(maps.shape[-1], pix, 12))
    lc = np.log(np.asarray(cl)[:, 0])
    x = maps.reshape(len(maps), -1).astype(np.float64)
    skew = ((x - x.mean(1, keepdims=True)) ** 3).mean(1) / x.std(1) ** 3
    return {
        "ell": np.asarray(ell)[-3:].round(0).tolist(),
        "log_cl_std": lc[:, -3:].std(0).round(4).tolist(),
        "skew_mean": round(float(skew.mean()), 3),
        "skew_std": round(float(skew.std()), 3),
    }


def cmd_spread(a: argparse.Namespace) -> None:
    import copy

    from scipy.special import ndtr, ndtri

    from lensflow.flows.preprocess import Preprocess

    model = KappaFlow.load(a.ckpt)
    glow = model.glow_ema
    pix = model.meta.pixel_arcmin
    tr = open_store(a.train)
    train = tr.read(tr.indices("train")[: a.n_train]).astype(np.float64)
    held = open_store(a.heldout)
    idx = np.sort(np.random.default_rng(a.seed).choice(len(held), min(a.n, len(held)), replace=False))
    rows = {"held-out simulations": _spread_summary(held.read(idx), pix)}
    lam = float(glow.preprocess.shift[0])
    z = torch.randn(a.n, *model.map_shape, generator=torch.Generator().manual_seed(a.seed))
    for factor in (1.0, 1.5, 2.0, 3.0, 5.0):
        g = copy.deepcopy(glow)  # the Gaussian part refitted with this shift; the Glow is not used
        g.preprocess = Preprocess(model.map_shape[0], log_shift=True, shift=lam * factor)
        g.fit_preprocessing(torch.as_tensor(train))
        with torch.no_grad():
            maps = g.preprocess.inverse(g.stationary.inverse(z, None), None).numpy()
        rows[f"Gaussian part, shift {factor:g} x ML ({lam * factor:.4f})"] = _spread_summary(maps, pix)
        print(list(rows)[-1], rows[list(rows)[-1]], flush=True)
    q = np.linspace(0, 1, 4001)[1:-1]
    knots = np.quantile(train, q)  # one channel: the pooled pixel quantiles of the training maps
    y = ndtri(np.clip(np.interp(train, knots, q), q[0], q[-1]))
    g = copy.deepcopy(glow)
    g.stationary.initialize(torch.as_tensor(y - y.mean()))
    with torch.no_grad():
        ys = g.stationary.inverse(z, None).double().numpy() + y.mean()
    rows["Gaussian copula (exact pixel PDF)"] = _spread_summary(np.interp(ndtr(ys), q, knots), pix)
    rows["n_maps"] = int(a.n)
    write_json(a.out, rows, indent=2)
    print(json.dumps(rows, indent=1))


def _moment_corr(mom: np.ndarray, box: np.ndarray | None, n_boot: int, seed: int) -> dict:
    """corr(variance, skewness) and corr(variance, kurtosis) of per-map moments [N, 4], box-bootstrapped."""

    def pair(m: np.ndarray) -> list[float]:
        return [float(np.corrcoef(m[:, 1], m[:, j])[0, 1]) for j in (2, 3)]

    out: dict = {"var_skew, var_kurt": pair(mom), "n_maps": int(len(mom))}
    if box is None or np.unique(box).size in (1, box.size):  # one value: a mock store, maps independent
        return out
    boxes = np.unique(box)
    rows = [np.flatnonzero(box == b) for b in boxes]
    rng = np.random.default_rng(seed)
    boot = [pair(mom[np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])]) for _ in range(n_boot)]
    out["se_box_bootstrap"] = np.std(boot, axis=0, ddof=1).tolist()
    out["mean_within_box"] = np.mean([pair(mom[r]) for r in rows], axis=0).tolist()
    out["n_boxes"] = int(len(boxes))
    return out


def cmd_moments(a: argparse.Namespace) -> None:
    import h5py

    out: dict = {}
    for folder in a.validate:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        with h5py.File(Path(folder) / "stats.h5", "r") as f:
            for side in ("reference", "candidate"):
                store = open_store(summary["inputs"][side]["path"])
                rid = store.read_realization()
                idx = f[f"indices/{side}"][:]
                for name in sorted(k for k in f[side] if k.startswith("moments@")):
                    key = f"{folder}:{side}:{name}"
                    box = None if rid is None else np.asarray(rid)[idx]
                    out[key] = _moment_corr(f[side][name][:], box, a.n_boot, a.seed)
                    print(key, json.dumps(out[key]), flush=True)
    write_json(a.out, out, indent=2)


def _squared_radii(model: KappaFlow, maps: np.ndarray) -> list[np.ndarray]:
    """Per latent (finest split first, top last), each map's ``|z|²`` under the model's EMA Glow (float64)."""
    sq: list[list[np.ndarray]] = []
    with torch.no_grad():
        for lo in range(0, len(maps), 250):
            zs, _ = model.glow_ema(torch.as_tensor(maps[lo : lo + 250]))
            sq.append([z.double().pow(2).flatten(1).sum(1).numpy() for z in zs])
    return [np.concatenate([b[i] for b in sq]) for i in range(len(sq[0]))]


def cmd_radii(a: argparse.Namespace) -> None:
    model = KappaFlow.load(a.ckpt)
    st, idx = _scored_maps(a)
    dims = [int(np.prod(s)) for s in model.glow_ema.latent_shapes]
    q = _squared_radii(model, st.read(idx))
    rows = {
        "latent_shapes": [list(s) for s in model.glow_ema.latent_shapes],
        "dispersion": [float((qi / d).std(ddof=1) / math.sqrt(2 / d)) for qi, d in zip(q, dims, strict=True)],
        "log_radius_corr": np.corrcoef(np.log(np.stack(q))).round(4).tolist(),
        "n_maps": int(idx.size),
    }
    write_json(a.out, rows, indent=2)
    print(json.dumps(rows))


def cmd_bands(a: argparse.Namespace) -> None:
    model = KappaFlow.load(a.ckpt)
    pix = model.meta.pixel_arcmin
    nyquist = math.pi / math.radians(pix / 60)
    # the bands are every other bin of these edges (C_ℓ's convention of lensflow.stats, so the log differs from the
    # log mean |FFT|² by a constant: spreads and correlations are the same)
    edges = [100.0, 500.0, 1300.0, 2000.0, 2300.0, nyquist]
    st, idx = _scored_maps(a)
    mocks = open_store(a.mocks)
    if mocks.npix != model.npix:
        raise ValueError(f"--mocks {a.mocks}: maps of {mocks.npix}² pixels, the model draws {model.npix}²")
    sets = {"heldout": st.read(idx), "mocks": mocks.read(np.arange(min(a.n, len(mocks))))}
    dim = int(np.prod(model.glow_ema.latent_shapes[0]))
    chi_sd = float(torch.special.polygamma(1, torch.tensor(dim / 2, dtype=torch.float64)).sqrt() / 2)
    rows: dict[str, Any] = {"ell_edges": [edges[i : i + 2] for i in (0, 2, 4)], "n_maps": {}}
    for name, maps in sets.items():
        u = 0.5 * np.log(_squared_radii(model, maps)[0])
        p = np.log(np.asarray(power_spectrum(maps.astype(np.float64), pix, edges)[1])[:, 0, ::2])
        c = np.corrcoef(np.column_stack([p, u]).T)
        r = c[-1, -2]
        rows["n_maps"][name] = len(maps)
        rows[name] = {
            "std_log_power": p.std(0, ddof=1).round(4).tolist(),
            "band_corr": c[:3, :3].round(3).tolist(),
            "finest_radius_spread_over_chi": round(float(u.std(ddof=1) / chi_sd), 3),
            "corr_finest_radius_top_band": round(float(r), 3),
            "top_band_std_not_from_radius": round(float(p[:, -1].std(ddof=1) * math.sqrt(1 - r * r)), 4),
        }
    write_json(a.out, rows, indent=2)
    print(json.dumps(rows))


def cmd_halves(a: argparse.Namespace) -> None:
    """Two stores of disjoint boxes (even and odd realization ids) for the simulations-against-simulations control."""
    st = open_store(a.store)
    rid = st.read_realization()
    for parity, out in ((0, a.out_even), (1, a.out_odd)):
        idx = np.flatnonzero(rid % 2 == parity)
        write_store(out, st.read(idx), st.meta, realization=rid[idx], split=np.full(idx.size, 2), overwrite=True)
        print(f"wrote {idx.size} maps of {np.unique(rid[idx]).size} boxes to {out}")


def cmd_perbin(a: argparse.Namespace) -> None:
    """Per-bin fractional mean errors with their clustered 1σ band, from validate summaries, as one figure."""
    import matplotlib.pyplot as plt

    names = ["cl", "peaks@2.0arcmin", "minima@2.0arcmin", "pdf@2.0arcmin", "v0@2.0arcmin", "v1@2.0arcmin"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    for path, label in zip(a.summaries, a.labels, strict=True):
        s = json.loads(Path(path).read_text())
        for ax, name in zip(axes.flat, names, strict=True):
            r = s["statistics"][name]
            x = np.asarray(s["bins"][name], dtype=float).reshape(-1)
            mr = np.asarray(r["mean_reference"], dtype=float)
            d = np.asarray(r["mean_candidate"], dtype=float) - mr
            z = np.asarray([np.nan if v is None else v for v in r["z_mean_pooled"]], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                se = np.where(z != 0, np.abs(d / z), np.nan) / np.abs(mr)
                frac = d / np.abs(mr)
            ok = np.abs(mr) > 3 * np.asarray(r["std_reference"], dtype=float) / math.sqrt(r["n_reference"])
            (line,) = ax.plot(x[ok], frac[ok], "o-", ms=3, label=label)
            if label == a.labels[0]:
                ax.fill_between(x[ok], -se[ok], se[ok], color="0.8", label="held-out ±1 SE (clustered)")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(name)
            ax.set_xlabel("ℓ" if name == "cl" else "ν (threshold / σ)")
            if name == "cl":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
    axes.flat[0].set_ylabel("mock / held-out − 1")
    axes.flat[3].set_ylabel("mock / held-out − 1")
    axes.flat[0].legend(fontsize=8)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gaussian-part")
    g.add_argument("--ckpt", required=True)
    g.add_argument("--n", type=int, default=4000)
    g.add_argument("--seed", type=int, default=5000)
    g.add_argument("--out", required=True)
    for name in ("bits", "radii", "bands"):  # each scores a model on a seeded subset of a store's maps
        b = sub.add_parser(name)
        if name == "bands":
            b.add_argument("--mocks", required=True, help="the model's mock store (its first --n maps)")
        b.add_argument("--ckpt", required=True)
        b.add_argument("--maps", required=True)
        b.add_argument("--n", type=int, default=2000)
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--split", default=None, help="train/val/test (default: every map); train vs test: overfitting")
        b.add_argument("--out", required=True)
    s = sub.add_parser("sims")
    s.add_argument("--train", required=True)
    s.add_argument("--heldout", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    h = sub.add_parser("halves")
    h.add_argument("--store", required=True)
    h.add_argument("--out-even", required=True)
    h.add_argument("--out-odd", required=True)
    w = sub.add_parser("spread")
    w.add_argument("--ckpt", required=True)
    w.add_argument("--train", required=True)
    w.add_argument("--heldout", required=True)
    w.add_argument("--n", type=int, default=2000)
    w.add_argument("--n-train", type=int, default=6000)
    w.add_argument("--seed", type=int, default=5)
    w.add_argument("--out", required=True)
    m = sub.add_parser("moments")
    m.add_argument("--validate", nargs="+", required=True, help="validate output folders")
    m.add_argument("--n-boot", type=int, default=1000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    f = sub.add_parser("perbin")
    f.add_argument("--summaries", nargs="+", required=True)
    f.add_argument("--labels", nargs="+", required=True)
    f.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        {
            "gaussian-part": cmd_gaussian_part,
            "bits": cmd_bits,
            "sims": cmd_sims,
            "halves": cmd_halves,
            "perbin": cmd_perbin,
            "spread": cmd_spread,
            "moments": cmd_moments,
            "radii": cmd_radii,
            "bands": cmd_bands,
        }[a.cmd](a)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
