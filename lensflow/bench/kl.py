"""KL-gap benchmark: Glow design variants trained on the same simulated maps, scored against the exact likelihood.

``python -m lensflow.bench kl`` simulates shifted-lognormal maps with :class:`~lensflow.sims.flat.FlatSimulator`
(training set, held-out set, fresh seeds), or draws them from a trained emulator, the teacher
(``bench.data.teacher=CKPT``; its ``log_prob`` is then the exact likelihood, a yardstick on non-Gaussian maps;
``python -m lensflow.bench kl_teacher``), trains every variant of ``bench.variants`` for the same number of
optimizer steps on the same data and seed, and reports for each the held-out KL gap (model bits/dim minus the
simulator's exact bits/dim, :func:`lensflow.sims.exact.kl_gap_bits`) with its standard error, the same gap on
training maps (memorization shows as train gap < held-out gap), the wall time, and the ratio of each gap to the
first variant's (the named baseline). The loop is the training recipe of :mod:`lensflow.training` in plain
PyTorch: AdamW, linear warmup then cosine decay, gradient clipping, EMA weights (scored), dihedral augmentation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lensflow._util.log import get_logger
from lensflow.bench import suite_config
from lensflow.flows import Glow
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.flat import FlatSimulator
from lensflow.sims.theory import PLANCK18

log = get_logger(__name__)

#: The keys of conf/bench/kl.yaml.
KEYS: tuple[str, ...] = (
    "data",
    "max_steps",
    "batch_size",
    "norm_maps",
    "eval_every",
    "seed",
    "threads",
    "variants",
)


def build_glow(channels: int, npix: int, model: Mapping[str, Any], periodic: bool, seed: int) -> Glow:
    """The Glow a variant's model mapping describes: every :meth:`Glow.config_keys` key it gives (keys of
    conf/model/glow.yaml that a Glow has no use for are ignored); the map geometry and padding are the data's."""
    fixed = {"in_channels": channels, "image_size": npix, "padding": "circular" if periodic else "zero", "cond_dim": 0}
    cfg = {k: model[k] for k in Glow.config_keys() if k in model and k not in fixed}
    return Glow.from_config({**fixed, **cfg}, init_seed=seed)


def _lr(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.from_numpy(_dihedral(x.numpy(), torch.randint(0, 8, (x.shape[0],), generator=g).numpy()))


@torch.no_grad()
def model_log_prob(glow: Glow, maps: np.ndarray, batch: int = 128) -> np.ndarray:
    """``glow.log_prob`` of maps [n, C, H, W] in nats per map, float64 [n]."""
    out = [glow.log_prob(torch.from_numpy(maps[i : i + batch])).double() for i in range(0, len(maps), batch)]
    return torch.cat(out).numpy()


def train_variant(
    variant: Mapping[str, Any], data: Mapping[str, Any], run: Mapping[str, Any], seed: int
) -> dict[str, Any]:
    """Train one variant on ``data`` (train/val/train_eval maps and exact log p); returns its row."""
    model, optim = dict(variant.get("model", {})), dict(variant.get("optim", {}))
    train = data["train"]
    if variant.get("n_train") is not None:  # fewer training maps for this variant (the first n_train)
        train = train[: int(variant["n_train"])]
    C, npix = train.shape[1], train.shape[-1]
    glow = build_glow(C, npix, model, bool(data["periodic"]), seed)
    n_norm = min(len(train), int(run["norm_maps"]))
    glow.fit_preprocessing(train[:n_norm])
    g = torch.Generator().manual_seed(seed)
    glow.initialize(torch.from_numpy(train[torch.randperm(len(train), generator=g)[:512].numpy()]))
    ema = copy.deepcopy(glow).requires_grad_(False)
    opt = torch.optim.AdamW(glow.parameters(), lr=float(optim.get("lr", 2e-3)), weight_decay=1e-5)
    steps, bs = int(variant.get("max_steps", run["max_steps"])), int(optim.get("batch_size", run["batch_size"]))
    warm, floor = int(optim.get("warmup_steps", 30)), float(optim.get("min_lr_ratio", 0.02))
    decay, clip = float(optim.get("ema_decay", 0.98)), float(optim.get("grad_clip", 50.0))
    # dihedral augmentation (default) assumes an isotropic field; a teacher need not be exactly isotropic
    augment = bool(optim.get("augment", True))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, warm, steps, floor))
    t0, history = time.perf_counter(), []
    order = torch.randperm(len(train), generator=g)
    pos = 0
    for step in range(steps):
        if pos + bs > len(order):
            order, pos = torch.randperm(len(train), generator=g), 0
        x = torch.from_numpy(train[order[pos : pos + bs].numpy()])
        x = _augment(x, g) if augment else x
        pos += bs
        loss = glow.bits_per_dim(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(glow.parameters(), clip)
        if torch.isfinite(loss) and torch.isfinite(gn):
            opt.step()
        sched.step()
        d = min(decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in glow.parameters()], 1.0 - d)
            for b_ema, b in zip(ema.buffers(), glow.buffers(), strict=True):
                b_ema.copy_(b)
        ema.clear_cache()
        every = int(run.get("eval_every") or 0)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            gap, se = kl_gap_bits(data["val_exact"], model_log_prob(ema, data["val"]), glow.num_dims)
            history.append((step + 1, round(time.perf_counter() - t0, 1), gap, se))
            log.info("  %s step %d: held-out KL gap %.5f ± %.5f bits/pixel", variant["name"], step + 1, gap, se)
    wall = time.perf_counter() - t0
    gap, se = kl_gap_bits(data["val_exact"], model_log_prob(ema, data["val"]), glow.num_dims)
    tgap, tse = kl_gap_bits(data["train_exact"], model_log_prob(ema, data["train_eval"]), glow.num_dims)
    n_params = sum(p.numel() for p in glow.parameters())
    return {
        "variant": variant["name"],
        "n_train": len(train),
        "kl_gap": gap,
        "kl_se": se,
        "train_gap": tgap,
        "train_se": tse,
        "steps": steps,
        "seconds": wall,
        "params": n_params,
        "history": history,
        "shift": glow.preprocess.shift.tolist() if glow.preprocess.log_shift else None,
    }


def simulate_data(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Training, held-out and train-evaluation maps with their exact log p (independent seeds): from the flat
    simulator of ``cfg``, or from the trained emulator ``cfg["teacher"]`` (:func:`teacher_data`)."""
    if cfg.get("teacher"):
        return teacher_data(cfg)
    cosmo = {**PLANCK18, **dict(cfg.get("cosmology") or {})}
    sim = FlatSimulator(
        int(cfg["npix"]),
        float(cfg["pixel_arcmin"]),
        cosmo,
        cfg.get("z_source", 1.0),
        kind=str(cfg.get("kind", "lognormal")),
        periodic=bool(cfg.get("periodic", False)),
    )
    seed = int(cfg.get("seed", 0))
    train = sim.generate(int(cfg["n_train"]), seed=[seed, 0])
    val = sim.generate(int(cfg["n_val"]), seed=[seed, 1])
    n_te = min(int(cfg["n_val"]), len(train))
    return {
        "train": train,
        "val": val,
        "train_eval": train[:n_te],
        "periodic": sim.periodic,
        "val_exact": sim.log_prob(val),
        "train_exact": sim.log_prob(train[:n_te]),
        "exact_bpd": float(-sim.log_prob(val).mean() / (sim.likelihood.num_dims * math.log(2))),
        "shift": None if sim.shift is None else sim.shift.tolist(),
    }


def teacher_data(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Maps drawn at T = 1 from a trained emulator, the teacher, scored by the teacher's own ``log_prob``.

    A trained emulator is a simulator with an exact likelihood. When it was trained on non-Gaussian maps (N-body),
    the KL gap of a student trained on its draws scores design choices on a non-Gaussian field, which no flat
    simulator offers. Training maps are the teacher's draws of seed ``2 seed``, held-out maps of ``2 seed + 1``
    (map ``i`` from the stream ``(seed, i)``, as ``python -m lensflow.generate``). A conditional teacher draws at the
    one condition ``theta`` ({name: value}); the flat simulator's keys (``npix``, ``kind``, ...) are not used.
    """
    from lensflow.emulator import Emulator

    path = str(cfg["teacher"])
    teacher = Emulator.load(path, device="cpu")
    theta = cfg.get("theta")
    if teacher.param_names and not theta:
        raise ValueError(
            f"bench kl: data.teacher {path} is conditional on {list(teacher.param_names)}: give data.theta, "
            f"e.g. data.theta={{{teacher.param_names[0]}: ...}}"
        )
    if theta and not teacher.param_names:
        raise ValueError(f"bench kl: data.theta given, but data.teacher {path} is unconditional")
    cond = dict(theta) if theta else None
    seed = int(cfg.get("seed", 0))
    n_train, n_val = int(cfg["n_train"]), int(cfg["n_val"])
    symmetric = bool(cfg.get("symmetrize", False))
    log.info("teacher %s: drawing %d training and %d held-out maps", path, n_train, n_val)
    train = teacher.sample(n_train, cond=cond, seed=2 * seed)
    val = teacher.sample(n_val, cond=cond, seed=2 * seed + 1)
    if symmetric:
        train = _dihedral(train, np.random.default_rng([seed, 0, 8]).integers(0, 8, n_train))
        val = _dihedral(val, np.random.default_rng([seed, 1, 8]).integers(0, 8, n_val))

    def exact(maps: np.ndarray) -> np.ndarray:
        return dihedral_log_prob(teacher, maps, cond) if symmetric else teacher.log_prob(maps, cond=cond)

    n_te = min(n_val, n_train)
    val_exact = exact(val)
    num_dims = int(np.prod(val.shape[1:]))
    return {
        "train": train,
        "val": val,
        "train_eval": train[:n_te],
        "periodic": bool(teacher.meta.periodic),
        "val_exact": val_exact,
        "train_exact": exact(train[:n_te]),
        "exact_bpd": float(-val_exact.mean() / (num_dims * math.log(2))),
        "shift": None,
        "teacher": path + (" (dihedral average)" if symmetric else ""),
    }


def dihedral_log_prob(model: Any, maps: np.ndarray, cond: Any = None) -> np.ndarray:
    """log p_sym(x) [n] (nats) of the dihedral average p_sym(x) = Σ_g p(g x)/8 of ``model.log_prob``.

    p_sym is the distribution of the model's draws each turned by a random element g of the square's symmetry
    group, and the target of a student trained with dihedral augmentation.
    """
    per_g = np.stack([model.log_prob(_dihedral(maps, np.full(len(maps), k)), cond=cond) for k in range(8)])
    top = per_g.max(axis=0)
    return top + np.log(np.exp(per_g - top).mean(axis=0))


def _dihedral(maps: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each map [C, H, W] turned by its element of the dihedral group of the square (code 0..7, as the training
    augmentation: bit 0 transposes, bit 1 flips H, bit 2 flips W)."""
    x = torch.from_numpy(np.ascontiguousarray(maps))
    code = torch.from_numpy(np.asarray(codes, dtype=np.int64)).view(-1, 1, 1, 1)
    x = torch.where(code & 1 == 1, x.transpose(-1, -2), x)
    x = torch.where(code & 2 == 2, x.flip(-2), x)
    return torch.where(code & 4 == 4, x.flip(-1), x).numpy()


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every variant on one data set; the first variant is the baseline of the ratios."""
    cfg = suite_config(cfg, KEYS, "kl")
    if not cfg["variants"]:
        raise ValueError("bench kl: variants: give at least one variant")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data = simulate_data(cfg["data"])
    log.info("exact held-out bits/dim %.5f; true shift %s", data["exact_bpd"], data["shift"])
    rows = []
    for variant in cfg["variants"]:
        log.info("training %s", variant["name"])
        r = train_variant(variant, data, cfg, int(cfg.get("seed", 0)))
        rows.append(r)
        log.info(
            "%s: held-out KL gap %.5f ± %.5f, train %.5f ± %.5f bits/pixel, %.0f s",
            r["variant"],
            r["kl_gap"],
            r["kl_se"],
            r["train_gap"],
            r["train_se"],
            r["seconds"],
        )
    base = rows[0]
    out = []
    for r in rows:
        out.append(
            {
                "benchmark": "kl_gap",
                "device": "cpu",
                "variant": r["variant"],
                "baseline": base["variant"],
                "value": r["kl_gap"],
                "unit": "bits/pixel",
                "ratio": r["kl_gap"] / base["kl_gap"],
                "se": r["kl_se"],
                "train_gap": r["train_gap"],
                "n_train": r["n_train"],
                "steps": r["steps"],
                "seconds": r["seconds"],
                "params": r["params"],
                "shift": r["shift"],
                "data": data.get("teacher", f"{cfg['data'].get('kind', 'lognormal')} flat simulator"),
            }
        )
    return out
