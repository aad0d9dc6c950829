"""Benchmark ``flow``: lensflow's Glow against normflows' Glow of the same size, same process, same data.

Both models get the reference configuration (``channels x image_size^2`` maps, ``levels`` levels of
``steps`` flow steps with coupling networks of width ``hidden``; normflows built as in its Glow example:
``GlowBlock`` with channel split and sigmoid scale, ``GlowBase`` priors, ``MultiscaleFlow``). Rows:

* ``flow/train``: maps/s of one training step (``-log p`` on a batch, backward, Adam step), timed
  interleaved with the baseline step so machine load hits both alike; best of the timed steps.
  On CUDA (``bf16: auto``; true/false force it) a second lensflow row uses bf16 autocast (log-dets stay
  float32).
* ``flow/sample``: maps/s of ``sample(batch)`` in eval mode without autograd.
* ``flow/bits_per_dim``: held-out bits/dim after the same number of Adam steps (same learning rate,
  warm-up, batches and order) on periodic Gaussian random fields of known spectrum; ``exact`` is the
  true model's bits/dim (FFT), the floor both approach. Lower is better; ``delta`` = lensflow - baseline.

normflows is the optional ``[bench]`` extra: without it the rows say so and carry no ratio.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lensflow._util.log import get_logger
from lensflow.bench import suite_config
from lensflow.flows import Glow, Preprocess

log = get_logger(__name__)

#: The keys of ``conf/bench/flow.yaml`` (where their defaults and meanings are); :func:`run` needs them all.
KEYS: tuple[str, ...] = (
    "channels", "image_size", "levels", "steps", "hidden", "batch", "devices", "iters", "lr", "warmup_steps",
    "padding", "spectrum_k0", "threads", "bf16", "seed",
)  # fmt: skip
_MISSING = "normflows Glow (NOT INSTALLED: pip install 'lensflow[bench]')"


# -- models ------------------------------------------------------------------------------------------------------
def normflows_glow(channels: int, image_size: int, levels: int, steps: int, hidden: int) -> torch.nn.Module:
    """normflows' multi-scale Glow (its README/example construction) with the given size."""
    import normflows as nf

    with warnings.catch_warnings():
        # normflows' LU initialisation calls the deprecated torch.lu
        warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")
        return _normflows_glow(nf, channels, image_size, levels, steps, hidden)


def _normflows_glow(nf: Any, channels: int, image_size: int, levels: int, steps: int, hidden: int) -> Any:
    q0, merges, flows = [], [], []
    for i in range(levels):
        level = [
            nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(steps)
        ]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            s = image_size // 2 ** (levels - i)
            shape = (channels * 2 ** (levels - i), s, s)
        else:
            s = image_size // 2**levels
            shape = (channels * 2 ** (levels + 1), s, s)
        q0.append(nf.distributions.GlowBase(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


class _Adapter:
    """One interface over both libraries: log_prob(x), sample(n)."""

    def __init__(self, name: str, model: torch.nn.Module, autocast: bool = False) -> None:
        self.name, self.model, self.autocast = name, model, autocast
        self.is_lensflow = isinstance(model, Glow)

    def _ctx(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        with self._ctx(x.device):
            return self.model.log_prob(x) if self.is_lensflow else self.model.log_prob(x, None)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device) -> torch.Tensor:
        with self._ctx(device):
            return self.model.sample(n) if self.is_lensflow else self.model.sample(n)[0]


# -- data ----------------------------------------------------------------------------------------------------------
def _spectrum(size: int, k0: float, device: torch.device) -> torch.Tensor:
    """Power per DFT mode, normalised to unit pixel variance (float64)."""
    f = torch.fft.fftfreq(size, device=device, dtype=torch.float64) * size
    k = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    p = (1.0 + (k / k0) ** 2) ** -1.5
    return p / p.mean()


def _grf(n: int, channels: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, channels, *p.shape, generator=g, dtype=torch.float64, device=p.device)
    return torch.fft.ifft2(torch.sqrt(p) * torch.fft.fft2(w)).real.float()


def _exact_bpd(x: torch.Tensor, p: torch.Tensor) -> float:
    """Mean bits/dim of x under the true periodic Gaussian (channels independent)."""
    x = x.double()
    npix = p.numel()
    quad = (torch.fft.fft2(x).abs() ** 2 / p).sum(dim=(1, 2, 3)) / npix
    lp = -0.5 * quad - 0.5 * x.shape[1] * (torch.log(p).sum() + npix * math.log(2 * math.pi))
    return float(-lp.mean() / (x[0].numel() * math.log(2)))


# -- timing --------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _train_step(m: _Adapter, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = -m.log_prob(x).mean() / x[0].numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if torch.isfinite(loss):
        opt.step()
    return float(loss.detach())


def _interleaved(fns: dict[str, Callable[[], Any]], warmup: int, iters: int, device: torch.device) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for k, f in fns.items():
            t = _timed(f, device)
            if i >= warmup:
                times[k].append(t)
    # best of the timed runs: on a shared machine, load only ever slows a run down
    return {k: min(v) for k, v in times.items()}


def _build(cfg: Mapping[str, Any], device: torch.device, seed: int, with_baseline: bool, data: torch.Tensor):
    c, s, lv, st, h = (int(cfg[k]) for k in ("channels", "image_size", "levels", "steps", "hidden"))
    pre = Preprocess(c)
    pre.fit(data.cpu())
    ours = Glow(c, s, lv, st, h, padding=str(cfg["padding"]), preprocess=pre, init_seed=seed).to(device)
    base = None
    if with_baseline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = normflows_glow(c, s, lv, st, h).to(device)
    return ours, base


# -- suite ---------------------------------------------------------------------------------------------------------
def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for train and sampling throughput and bits/dim after equal steps (see the module docstring);
    ``cfg``: the keys of ``conf/bench/flow.yaml``."""
    cfg = suite_config(cfg, KEYS, "flow")
    iters_cfg = cfg["iters"]
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        import normflows  # noqa: F401

        have_baseline = True
    except ImportError:
        have_baseline = False
        log.warning(
            "normflows is not installed (optional extra: pip install 'lensflow[bench]'): lensflow rows only, no ratios"
        )
    bf16 = cfg["bf16"]
    if bf16 not in ("auto", True, False):
        raise ValueError(f"bench.bf16: expected auto, true or false, got {bf16!r}")
    devices = [d for d in cfg["devices"] if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    seed = int(cfg["seed"])
    B = int(cfg["batch"])
    c, s = int(cfg["channels"]), int(cfg["image_size"])
    shape = f"{c}x{s}x{s}, L={cfg['levels']}, K={cfg['steps']}, hidden={cfg['hidden']}"
    baseline_name = "normflows Glow" if have_baseline else _MISSING
    rows: list[dict[str, Any]] = []

    for dev_name in devices:
        device = torch.device(dev_name)
        it = iters_cfg[dev_name]
        g = torch.Generator(device=device).manual_seed(seed)
        p = _spectrum(s, float(cfg["spectrum_k0"]), device)
        x = _grf(B, c, p, g)
        ours, base = _build(cfg, device, seed, have_baseline, _grf(256, c, p, g))
        common = {"device": dev_name, "batch": B, "model": shape, "params": sum(q.numel() for q in ours.parameters())}
        if base is not None:
            common["baseline_params"] = sum(q.numel() for q in base.parameters())

        # training throughput (fp32 both; + lensflow bf16 autocast on CUDA)
        models = {"lensflow": _Adapter("lensflow", ours)}
        if (dev_name == "cuda") if bf16 == "auto" else bf16:
            models["lensflow bf16-autocast"] = _Adapter("lensflow bf16-autocast", ours, autocast=True)
        if base is not None:
            models["baseline"] = _Adapter("normflows", base)
        opts = {k: torch.optim.Adam(m.model.parameters(), lr=1e-5) for k, m in models.items()}
        for m in models.values():
            m.log_prob(x[:4]).sum()  # data-dependent inits outside the timing
        t = _interleaved(
            {k: (lambda m=m, o=opts[k], x=x: _train_step(m, o, x)) for k, m in models.items()},
            int(it["warmup"]),
            int(it["train"]),
            device,
        )
        rows += _rate_rows("flow/train", t, B, baseline_name, common)

        # sampling throughput
        for m in models.values():
            m.model.eval()
        t = _interleaved(
            {k: (lambda m=m, d=device: m.sample(B, d)) for k, m in models.items()}, 1, int(it["sample"]), device
        )
        rows += _rate_rows("flow/sample", t, B, baseline_name, common)
        del models, opts, ours, base

        rows.extend(_bpd_rows(cfg, it, device, p, have_baseline, baseline_name, common))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _rate_rows(benchmark: str, t: dict[str, float], batch: int, baseline_name: str, common: dict) -> list[dict]:
    """One maps/s row per lensflow variant in ``t`` (seconds per batch), with its ratio to ``t["baseline"]``."""
    rows = []
    for k, sec in t.items():
        if k == "baseline":
            continue
        row = {**common, "benchmark": benchmark, "variant": k, "baseline": baseline_name,
               "value": batch / sec, "unit": "maps/s", "ratio": None}  # fmt: skip
        if "baseline" in t:
            row["ratio"] = t["baseline"] / sec
            row["baseline_value"] = batch / t["baseline"]
        rows.append(row)
    return rows


def _bpd_rows(cfg, it, device, p, have_baseline, baseline_name, common) -> list[dict[str, Any]]:
    """Equal-step training of fresh models on the same GRF batches; held-out bits/dim."""
    seed, c = int(cfg["seed"]), int(cfg["channels"])
    g = torch.Generator(device=device).manual_seed(seed + 1)
    test = _grf(int(it["bpd_test"]), c, p, g)
    exact = _exact_bpd(test, p)
    ours, base = _build(cfg, device, seed, have_baseline, _grf(256, c, p, g))
    models = {"lensflow": _Adapter("lensflow", ours)}
    if base is not None:
        models["baseline"] = _Adapter("normflows", base)
    steps, bb = int(it["bpd_steps"]), int(it["bpd_batch"])
    lr, warm = float(cfg["lr"]), int(cfg["warmup_steps"])
    opts = {k: torch.optim.Adam(m.model.parameters(), lr=lr) for k, m in models.items()}
    scheds = {
        k: torch.optim.lr_scheduler.LambdaLR(o, lambda i: min(1.0, (i + 1) / max(warm, 1))) for k, o in opts.items()
    }
    skipped = {k: 0 for k in models}
    for _ in range(steps):
        x = _grf(bb, c, p, g)  # the same batch for both models
        for k, m in models.items():
            loss = _train_step(m, opts[k], x)
            skipped[k] += not math.isfinite(loss)
            scheds[k].step()
    bpd = {}
    for k, m in models.items():
        m.model.eval()
        with torch.no_grad():
            vals = torch.cat([-m.log_prob(test[i : i + 32]) for i in range(0, test.shape[0], 32)])
        bpd[k] = float(vals.double().mean() / (test[0].numel() * math.log(2)))
    row = {
        **common,
        "benchmark": "flow/bits_per_dim",
        "variant": "lensflow",
        "baseline": baseline_name,
        "value": bpd["lensflow"],
        "unit": "bits/dim",
        "ratio": None,
        "exact": exact,
        "train_steps": steps,
        "train_batch": bb,
        "skipped_steps": skipped["lensflow"],
    }
    if "baseline" in bpd:
        row["baseline_value"] = bpd["baseline"]
        row["delta"] = bpd["lensflow"] - bpd["baseline"]
        row["baseline_skipped_steps"] = skipped["baseline"]
    return [row]
