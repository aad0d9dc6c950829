"""Lightning module of a Glow emulator of κ maps (:class:`GlowModule`) and its checkpoint loader.

Training
--------
* loss: negative log-likelihood of κ in bits per dimension, ``-log2 p(κ) / (C H W)``, for the continuous
  density in κ units (it includes the Jacobian of the fixed preprocessing, and can be negative);
* AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr`` over the run (per optimizer step);
  clipping of the global gradient norm;
* EMA of the weights, updated after every optimizer step with decay ``min(ema_decay, (1+t)/(10+t))``;
  validation, :meth:`GlowModule.sample` and generation use the EMA weights;
* a step whose loss or gradient is non-finite (on any rank) is skipped on every rank and counted
  (``train/skipped_steps``); ``max_nonfinite_steps`` in a row stop the run with
  :class:`TrainingDivergedError`; a checkpoint holding NaN/Inf parameters or optimizer state is never
  written (:class:`NonFiniteCheckpointError`).

Checkpoints
-----------
A checkpoint holds both weight sets: ``glow.*`` (raw weights, which the optimizer state belongs to; a
resume needs them) and ``glow_ema.*`` (the EMA weights used for sampling). It also holds the
normalisation (``glow.preprocess.*`` buffers, ``cond_mean``/``cond_std``), the hyperparameters as plain
dicts (so ``torch.load(path, weights_only=True)`` works and ``GlowModule.load_from_checkpoint(path)``
needs no arguments) and a ``"lensflow"`` entry: version, model kind ``"glow"``, resolved run config,
training store path and its metadata, provenance.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lensflow import __version__
from lensflow.flows import ActNorm, Glow, Preprocess
from lensflow.provenance import _jsonable, provenance

__all__ = [
    "GlowModule",
    "NonFiniteCheckpointError",
    "TrainingDivergedError",
    "load_glow_module",
    "sample_check",
    "MODEL_KIND",
]

MODEL_KIND = "glow"
_MODEL_KEYS = (
    "kind",
    "levels",
    "steps",
    "hidden",
    "cond_dim",
    "padding",
    "log_shift",
    "scale_bound",
    "prior_bound",
    "learn_top_prior",
)
_OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "weight_decay": 1e-5,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "warmup_steps": 500,
    "min_lr_ratio": 0.02,
    "grad_clip": 50.0,
    "ema_decay": 0.999,
    "max_nonfinite_steps": 20,
}
_CHECK_DEFAULTS: dict[str, Any] = {
    "every": 1,
    "n_samples": 256,
    "temperature": 1.0,
    "smoothing_arcmin": None,
    "n_bins": 16,
    "batch_size": 64,
    "final": True,
}


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses/gradients in a row: the run cannot continue."""


class NonFiniteCheckpointError(RuntimeError):
    """Refused to write a checkpoint with NaN/Inf parameters or optimizer state."""


class _WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``.

    A plain callable object (not a closure) so LambdaLR's state_dict stays plain data.
    """

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _plain(obj: Any) -> Any:
    """Plain JSON types (dict/list/str/float/int/bool/None) from configs, tuples, numpy scalars."""
    if obj is None:
        return None
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return _jsonable(obj)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


class GlowModule(L.LightningModule):
    """A Glow on κ maps with EMA weights, its normalisation and its training loop.

    Args:
        model: Glow settings (``conf/model``): ``levels, steps, hidden, padding ("auto"|"zero"|"circular"),
            log_shift, scale_bound, prior_bound, learn_top_prior, cond_dim (None = len(param_names))``.
        map_meta: the training maps: ``pixel_arcmin, source_redshifts, periodic, npix, channels, kind,
            store`` (see :meth:`lensflow.data.KappaDataModule.map_meta`).
        param_names: conditioning parameter names (empty: unconditional).
        optim: ``conf/optim`` (lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio, grad_clip,
            ema_decay, max_nonfinite_steps).
        check: ``check`` node of ``conf/train.yaml`` (in-training sample checks).
        seed: seed of the weight initialisation and of the check samples.
        config: the resolved run config (provenance; plain dict).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        map_meta: Mapping[str, Any],
        param_names: Sequence[str] = (),
        optim: Mapping[str, Any] | None = None,
        check: Mapping[str, Any] | None = None,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model = dict(_plain(model) or {})
        map_meta = dict(_plain(map_meta) or {})
        names = [str(p) for p in (param_names or ())]
        optim = {**_OPTIM_DEFAULTS, **(_plain(optim) or {})}
        check = {**_CHECK_DEFAULTS, **(_plain(check) or {})}
        unknown = sorted(set(model) - set(_MODEL_KEYS))
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; known: {list(_MODEL_KEYS)}")
        if model.get("kind", MODEL_KIND) != MODEL_KIND:
            raise ValueError(f"model.kind must be {MODEL_KIND!r}, got {model.get('kind')!r}")
        for key in ("channels", "npix", "pixel_arcmin"):
            if key not in map_meta:
                raise ValueError(f"map_meta: missing {key!r}")
        cond_dim = model.get("cond_dim")
        if cond_dim is not None and cond_dim != len(names):
            raise ValueError(
                f"model.cond_dim={cond_dim} but the data give {len(names)} conditioning parameters "
                f"({names}); set data.cond or model.cond_dim=null"
            )
        self.save_hyperparameters(
            {
                "model": model,
                "map_meta": map_meta,
                "param_names": names,
                "optim": optim,
                "check": check,
                "seed": int(seed),
                "config": _plain(config),
            }
        )
        self.automatic_optimization = False

        padding = model.get("padding", "auto")
        if padding == "auto":
            padding = "circular" if map_meta.get("periodic") else "zero"
        channels, npix = int(map_meta["channels"]), int(map_meta["npix"])
        pre = Preprocess(channels, log_shift=bool(model.get("log_shift", False)))
        self.glow = Glow(
            channels,
            npix,
            int(model.get("levels", 4)),
            int(model.get("steps", 32)),
            int(model.get("hidden", 512)),
            cond_dim=len(names),
            padding=padding,
            preprocess=pre,
            scale_bound=float(model.get("scale_bound", 2.0)),
            prior_bound=float(model.get("prior_bound", 5.0)),
            learn_top_prior=bool(model.get("learn_top_prior", True)),
            init_seed=int(seed),
        )
        self.glow_ema = copy.deepcopy(self.glow)
        self.glow_ema.requires_grad_(False)
        self.register_buffer("cond_mean", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("cond_std", torch.ones(len(names), dtype=torch.float64))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._check_cache: dict[str, Any] | None = None
        self._init_done = False
        self._provenance: dict[str, Any] | None = None

    # -- description ------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Conditioning parameter names (``()`` if unconditional)."""
        return tuple(self.hparams["param_names"])

    @property
    def map_meta(self) -> dict[str, Any]:
        """The training maps: pixel_arcmin, source_redshifts, periodic, npix, channels, kind, store."""
        return dict(self.hparams["map_meta"])

    @property
    def num_dims(self) -> int:
        return self.glow.num_dims

    # -- normalisation ----------------------------------------------------------------------------------
    def fit_normalization(
        self,
        maps: np.ndarray | Tensor,
        cond_mean: Sequence[float] | np.ndarray = (),
        cond_std: Sequence[float] | np.ndarray = (),
    ) -> None:
        """Set the κ preprocessing from training maps [N, C, H, W] and the cond statistics [P] (physical)."""
        self.glow.preprocess.fit(maps)
        self.glow_ema.preprocess.load_state_dict(self.glow.preprocess.state_dict())
        mean = torch.as_tensor(np.asarray(cond_mean, dtype=np.float64).reshape(-1))
        std = torch.as_tensor(np.asarray(cond_std, dtype=np.float64).reshape(-1))
        if mean.numel() != len(self.param_names) or std.numel() != len(self.param_names):
            raise ValueError(f"cond_mean/cond_std must have {len(self.param_names)} entries")
        if not bool(torch.all(std > 0)):
            raise ValueError("cond_std must be positive")
        self.cond_mean.copy_(mean)
        self.cond_std.copy_(std)

    def normalize_cond(self, cond: Any, n: int | None = None) -> Tensor | None:
        """Physical conditioning values -> the normalised float32 ``[n, P]`` tensor the Glow takes.

        ``cond``: ``None`` (unconditional models), a tensor/array ``[n, P]`` or ``[P]`` in the order of
        :attr:`param_names`, or a dict ``{name: value or [n] values}``.
        """
        names = self.param_names
        if not names:
            empty = (
                cond is None
                or (isinstance(cond, Mapping) and not cond)
                or (not isinstance(cond, Mapping) and np.size(_numpy(cond)) == 0)
            )
            if not empty:
                raise ValueError("cond: this model is unconditional; pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"cond: this model is conditioned on {list(names)}; pass values for them")
        if isinstance(cond, Mapping):
            missing = [k for k in names if k not in cond]
            extra = [k for k in cond if k not in names]
            if missing or extra:
                raise ValueError(f"cond: expected keys {list(names)}, missing {missing}, unknown {extra}")
            cols = [torch.as_tensor(np.asarray(cond[k], dtype=np.float64)).reshape(-1) for k in names]
            m = max(c.numel() for c in cols) if n is None else n
            if any(c.numel() not in (1, m) for c in cols):
                raise ValueError(f"cond: every value must be a scalar or have {m} entries")
            c = torch.stack([col.expand(m) if col.numel() == 1 else col for col in cols], dim=1)
        else:
            c = torch.as_tensor(
                cond.detach().cpu().numpy() if isinstance(cond, Tensor) else np.asarray(cond),
                dtype=torch.float64,
            )
            if c.dim() == 1:
                c = c.unsqueeze(0)
            if c.dim() != 2 or c.shape[1] != len(names):
                want = f"[n, {len(names)}] ({list(names)})"
                raise ValueError(f"cond must have shape {want}, got {tuple(c.shape)}")
        if n is not None:
            if c.shape[0] == 1:
                c = c.expand(n, -1)
            elif c.shape[0] != n:
                raise ValueError(f"cond has {c.shape[0]} rows for {n} maps")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("cond: values must be finite")
        c = (c.to(self.cond_mean.device) - self.cond_mean) / self.cond_std
        return c.to(torch.float32)

    def _batch_cond(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        if not self.param_names:
            return None
        c = batch["cond"].to(torch.float64)
        return ((c - self.cond_mean) / self.cond_std).to(torch.float32)

    # -- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Any = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        ema: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        """Draw ``n`` maps ``[n, C, H, W]`` in κ units (normalisation undone), EMA weights by default.

        Args:
            n: number of maps.
            cond: physical conditioning values (see :meth:`normalize_cond`); one row is broadcast to all maps.
            temperature: latent temperature (1 = the trained distribution).
            generator: torch generator of the latent noise (its device is used for the draw).
            noise: ``[n, C*H*W]`` standard-normal latents (order: :class:`lensflow.flows.Glow`), not drawn.
            ema: use the EMA weights (default) or the raw weights.
            batch_size: maps per pass (default all at once).
        """
        glow = self.glow_ema if ema else self.glow
        c = self.normalize_cond(cond, n)
        was_training = glow.training
        glow.eval()
        try:
            if batch_size is None or batch_size >= n:
                return glow.sample(n, cond=c, temperature=temperature, generator=generator, noise=noise)
            out = []
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                out.append(
                    glow.sample(
                        hi - lo,
                        cond=None if c is None else c[lo:hi],
                        temperature=temperature,
                        generator=generator,
                        noise=None if noise is None else noise[lo:hi],
                    )
                )
            return torch.cat(out)
        finally:
            glow.train(was_training)

    def log_prob(self, x: Tensor, cond: Any = None, ema: bool = True) -> Tensor:
        """``log p(κ)`` in nats per map [B] (EMA weights by default); ``cond`` in physical units."""
        glow = self.glow_ema if ema else self.glow
        return glow.log_prob(x, self.normalize_cond(cond, x.shape[0]))

    # -- initialisation ---------------------------------------------------------------------------------
    def is_initialized(self) -> bool:
        """Whether the data-dependent ActNorm initialisation has run (or came with loaded weights)."""
        if not self._init_done:
            self._init_done = all(m.is_initialized for m in self.glow.modules() if isinstance(m, ActNorm))
        return self._init_done

    @torch.no_grad()
    def initialize(self, x: Tensor, cond: Tensor | None = None) -> None:
        """Data-dependent ActNorm initialisation of the raw weights on ``x`` (κ) and ``cond`` (normalised),
        then EMA := raw. Every rank must call this at the same time (ActNorm all-reduces its statistics)."""
        self.glow.initialize(x, cond)
        self.glow_ema.load_state_dict(self.glow.state_dict())
        self.ema_steps.zero_()

    def on_fit_start(self) -> None:
        if self.is_initialized():
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "eval_maps"):
            return  # initialised lazily by the first training batch
        n = min(max(4 * getattr(dm, "batch_size", 64), 64), 512)
        # The same maps on every rank (the first training maps): identical init even without all-reduce.
        maps, params = dm.eval_maps("train", n)
        x = torch.as_tensor(maps, device=self.device)
        c = self._batch_cond({"cond": torch.as_tensor(params, device=self.device)})
        self.initialize(x, c)

    # -- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.hparams["optim"]
        opt = torch.optim.AdamW(
            self.glow.parameters(),
            lr=float(o["lr"]),
            betas=tuple(o["betas"]),
            eps=float(o["eps"]),
            weight_decay=float(o["weight_decay"]),
        )
        total = (
            self.trainer.max_steps
            if self.trainer.max_steps and self.trainer.max_steps > 0
            else int(self.trainer.estimated_stepping_batches)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _WarmupCosine(int(o["warmup_steps"]), int(total), float(o["min_lr_ratio"]))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run restores the LR schedule of the checkpoint; stretch its cosine to this run's
        # length, so a resume with a larger trainer.max_steps extends the schedule (a no-op otherwise).
        sched = self.lr_schedulers()
        lam = sched.lr_lambdas[0] if sched is not None else None
        if isinstance(lam, _WarmupCosine):
            total = (
                self.trainer.max_steps
                if self.trainer.max_steps and self.trainer.max_steps > 0
                else int(self.trainer.estimated_stepping_batches)
            )
            if total != lam.total:
                lam.total = int(total)
                for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
                    group["lr"] = base * lam(sched.last_epoch)

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (the same answer everywhere)."""
        if self.trainer.world_size <= 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(t, reduce_op="sum") > 0)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["kappa"]
        c = self._batch_cond(batch)
        if not self.is_initialized():
            self.initialize(x, c)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        o = self.hparams["optim"]
        loss = self.glow.bits_per_dim(x, c).mean()
        bad_loss = self._any_rank(not bool(torch.isfinite(loss.detach())))
        gnorm = torch.tensor(float("nan"), device=self.device)
        if bad_loss:
            # Every rank still runs a backward that reaches all parameters (zero gradients), so DDP's
            # gradient reduction stays in step across ranks; the optimizer step is then skipped.
            self.manual_backward(sum(p.sum() for p in self.glow.parameters()) * 0.0)
        else:
            self.manual_backward(loss)
            clip = o.get("grad_clip")
            gnorm = torch.nn.utils.clip_grad_norm_(
                self.glow.parameters(), float(clip) if clip else float("inf"), error_if_nonfinite=False
            )
        skip = bad_loss or not bool(torch.isfinite(gnorm))  # gradients are all-reduced: same on all ranks
        if skip:
            opt.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            limit = int(o["max_nonfinite_steps"])
            what = "loss" if bad_loss else "gradient norm"
            rank_zero_warn(
                f"non-finite {what} at optimizer step {self.global_step}: step skipped "
                f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)"
            )
            if self.nonfinite_in_a_row >= limit:
                raise TrainingDivergedError(
                    f"training stopped: {self.nonfinite_in_a_row} steps in a row with a non-finite {what} "
                    f"(optimizer step {self.global_step}, {self.nonfinite_total} skipped in all; limit "
                    f"optim.max_nonfinite_steps={limit}); try a lower optim.lr, a smaller optim.grad_clip or "
                    "model.log_shift, and check the data"
                )
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            self._update_ema()
            self.nonfinite_in_a_row = 0
        bs = x.shape[0]
        if not bad_loss:  # all ranks agree on bad_loss, so the synced log stays collective
            self.log(
                "train/bits_per_dim",
                loss.detach(),
                on_step=True,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=bs,
            )
        self.log(
            "train/grad_norm",
            gnorm.detach().float(),
            on_step=True,
            on_epoch=False,
            sync_dist=True,
            batch_size=bs,
        )
        skipped = float(self.nonfinite_total)
        self.log("train/skipped_steps", skipped, on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/lr", float(opt.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=bs)
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = float(self.hparams["optim"]["ema_decay"])
        t = int(self.ema_steps.item())
        d = min(decay, (1.0 + t) / (10.0 + t))
        ema = [p for p in self.glow_ema.parameters()]
        raw = [p.detach() for p in self.glow.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - d)
        self.ema_steps += 1
        self.glow_ema.clear_cache()

    # -- validation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["kappa"]
        bpd = self.glow_ema.bits_per_dim(x, self._batch_cond(batch)).mean()
        self.log(
            "val/bits_per_dim",
            bpd,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=x.shape[0],
        )
        return bpd

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["kappa"]
        bpd = self.glow_ema.bits_per_dim(x, self._batch_cond(batch)).mean()
        bs = x.shape[0]
        self.log("test/bits_per_dim", bpd, on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
        return bpd

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        every = int(self.hparams["check"].get("every") or 0)
        if trainer.sanity_checking or every <= 0 or (trainer.current_epoch + 1) % every:
            return
        if not trainer.is_global_zero:
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "eval_maps"):
            return
        chk = self.hparams["check"]
        if self._check_cache is None:
            maps, params = dm.eval_maps("val", int(chk["n_samples"]))
            self._check_cache = {"maps": maps, "params": params}
        out_dir = Path(trainer.default_root_dir) / "checks"
        tag = f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}"
        res = sample_check(
            self,
            self._check_cache["maps"],
            self._check_cache["params"],
            check=chk,
            seed=int(self.hparams["seed"]) + trainer.current_epoch,
            out_dir=out_dir,
            tag=tag,
        )
        for k, v in res["metrics"].items():
            self.log(f"check/{k}", float(v), rank_zero_only=True)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                for name, path in res["figures"].items():
                    try:
                        logger.log_image(key=f"check/{name}", images=[str(path)], step=trainer.global_step)
                    except Exception as e:  # noqa: BLE001 - a logger hiccup must not kill a long run
                        print(f"warning: could not log image {path} to {type(logger).__name__}: {e}")

    # -- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _refuse_nonfinite(checkpoint)
        if self._provenance is None:
            self._provenance = provenance(self.hparams.get("config"))
        checkpoint["lensflow"] = {
            "version": __version__,
            "model": MODEL_KIND,
            "config": self.hparams.get("config"),
            "data": {
                "store": self.map_meta.get("store"),
                "meta": self.map_meta,
                "param_names": list(self.param_names),
            },
            "provenance": self._provenance,
        }
        checkpoint["lensflow_counters"] = {
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("lensflow_counters", {})
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(counters.get("nonfinite_in_a_row", 0))


def _refuse_nonfinite(checkpoint: Mapping[str, Any]) -> None:
    for name, t in checkpoint.get("state_dict", {}).items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteCheckpointError(f"refusing to write a checkpoint: {name} has NaN/Inf values")
    for i, st in enumerate(checkpoint.get("optimizer_states", [])):
        for pid, s in st.get("state", {}).items():
            for k, t in s.items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteCheckpointError(
                        f"refusing to write a checkpoint: optimizer {i} state {k!r} of parameter {pid} "
                        "has NaN/Inf values"
                    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a lensflow Glow checkpoint dict, or raise a one-line ``ValueError`` naming the file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: checkpoint not found")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/format problem is a bad file to the user
        raise ValueError(
            f"{p}: not a readable lensflow checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    if not isinstance(ckpt, dict) or "lensflow" not in ckpt:
        raise ValueError(f"{p}: not a lensflow checkpoint (no 'lensflow' entry)")
    info = ckpt["lensflow"]
    kind = info.get("model") if isinstance(info, dict) else None
    if kind != MODEL_KIND:
        raise ValueError(f"{p}: a lensflow checkpoint of model kind {kind!r}, not {MODEL_KIND!r}")
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{p}: lensflow checkpoint without hyper_parameters/state_dict")
    return ckpt


def load_glow_module(path: str | os.PathLike, map_location: Any = "cpu") -> GlowModule:
    """Load a :class:`GlowModule` (eval mode) from a checkpoint; one-line ``ValueError`` naming the file if
    it is missing or not a lensflow Glow checkpoint."""
    ckpt = read_checkpoint(path, map_location)
    try:
        module = GlowModule(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError, KeyError) as e:
        raise ValueError(
            f"{path}: checkpoint does not match this lensflow's GlowModule "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    module.on_load_checkpoint(ckpt)
    if isinstance(map_location, (str, torch.device)):
        module = module.to(map_location)
    return module.eval()


# --------------------------------------------------------------------------------------------
# Sample checks (in training and after it)
# --------------------------------------------------------------------------------------------


def _smoothing(check: Mapping[str, Any], pixel_arcmin: float) -> float:
    s = check.get("smoothing_arcmin")
    return 2.0 * pixel_arcmin if s is None else float(s)


def _frac(ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, Any]:
    """Fractional error of the mean per bin, ``mean(cand)/mean(ref) - 1``; max and mean |.| over ``mask``."""
    r, c = ref.mean(axis=0), cand.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(r != 0, c / r - 1.0, np.nan)
    use = np.isfinite(f) if mask is None else (mask & np.isfinite(f))
    if not use.any():
        return float("nan"), float("nan"), f
    return float(np.abs(f[use]).max()), float(np.abs(f[use]).mean()), f


@torch.no_grad()
def sample_check(
    module: GlowModule,
    ref_maps: np.ndarray,
    ref_params: np.ndarray | None = None,
    *,
    check: Mapping[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    tag: str = "check",
    device: torch.device | str | None = None,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Sample as many maps as ``ref_maps`` (with ``ref_params`` as conditions) and compare statistics.

    Statistics (:mod:`lensflow.stats`, per channel): C_ℓ on ``default_ell_edges``; after Gaussian
    smoothing (``check.smoothing_arcmin``, default 2 pixels), peak counts and the pixel PDF on ``n_bins``
    bins between the 0.5% and 99.5% (PDF) / 50% and 99.9% (peaks) quantiles of the smoothed reference
    pixels. Fractional errors ``mean(sample)/mean(reference) - 1`` per bin are summarised by their max and
    mean absolute value over bins. Bins whose ratio is mostly noise are left out: peak bins with fewer than
    100 reference peaks in all (or than half the fullest bin, for small checks), and peak or PDF bins below
    1% of the largest bin. Non-finite samples are dropped and counted.

    Returns ``{"metrics": {...}, "figures": {name: path}, "bins": {...}, "samples": array or None}``
    (the samples only with ``keep_samples``).
    """
    from lensflow import stats

    chk = {**_CHECK_DEFAULTS, **(dict(check) if check else {})}
    mm = module.map_meta
    pix, periodic = float(mm["pixel_arcmin"]), bool(mm.get("periodic", False))
    ref = np.asarray(ref_maps, dtype=np.float64)
    n = ref.shape[0]
    dev = torch.device(device) if device is not None else module.device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(n, module.num_dims, generator=g)
    cond = ref_params if module.param_names else None
    samples = (
        module.sample(
            n,
            cond=cond,
            temperature=float(chk["temperature"]),
            noise=noise.to(dev),
            batch_size=int(chk["batch_size"]),
        )
        .double()
        .cpu()
        .numpy()
    )
    good = np.isfinite(samples).reshape(n, -1).all(axis=1)
    n_bad = int((~good).sum())
    s = samples[good]
    metrics: dict[str, float] = {"n_samples": float(n), "nonfinite_samples": float(n_bad)}
    bins: dict[str, Any] = {}
    if s.shape[0] < 2:
        metrics.update(
            {
                k: float("nan")
                for k in (
                    "cl_frac_max",
                    "cl_frac_mean",
                    "peaks_frac_max",
                    "peaks_frac_mean",
                    "pdf_frac_max",
                    "pdf_frac_mean",
                )
            }
        )
        return {"metrics": metrics, "figures": {}, "bins": bins, "samples": samples if keep_samples else None}
    npix = ref.shape[-1]
    edges = stats.default_ell_edges(npix, pix, nbins=min(20, max(4, npix // 4)))
    ell, cl_r = stats.power_spectrum(ref, pix, edges)
    _, cl_s = stats.power_spectrum(s, pix, edges)
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731 - [B, C, nb] -> [B, C*nb]
    cmax, cmean, cfrac = _frac(flat(cl_r), flat(cl_s))
    sig = _smoothing(chk, pix)
    sm_r = stats.smooth(ref, pix, sig, periodic=periodic)
    sm_s = stats.smooth(s, pix, sig, periodic=periodic)
    border = 0 if periodic else int(math.ceil(3.0 * sig / pix))
    border = min(border, npix // 4)
    inner = sm_r[..., border : npix - border, border : npix - border] if border else sm_r
    nb = int(chk["n_bins"])
    pdf_edges = np.quantile(inner, [0.005, 0.995])
    pdf_edges = np.linspace(pdf_edges[0], pdf_edges[1], nb + 1)
    peak_edges = np.linspace(*np.quantile(inner, [0.5, 0.999]), nb + 1)
    pk_r = flat(stats.peak_counts(sm_r, peak_edges, periodic=periodic, border=border))
    pk_s = flat(stats.peak_counts(sm_s, peak_edges, periodic=periodic, border=border))
    pdf_r = flat(stats.pixel_pdf(sm_r, pdf_edges, border=border))
    pdf_s = flat(stats.pixel_pdf(sm_s, pdf_edges, border=border))
    # Peak bins count only with >= 100 reference peaks in all (Poisson noise <= 10%; fewer for tiny
    # checks: half the fullest bin), so the max is not set by the sparse tail; PDF bins (many pixels
    # each) with >= 1% of the largest density.
    total = pk_r.sum(0)
    pk_mask = (total >= min(100.0, 0.5 * total.max())) & (pk_r.mean(0) >= 0.01 * pk_r.mean(0).max())
    pdf_mask = pdf_r.mean(0) >= 0.01 * pdf_r.mean(0).max()
    pmax, pmean, pfrac = _frac(pk_r, pk_s, pk_mask)
    dmax, dmean, dfrac = _frac(pdf_r, pdf_s, pdf_mask)
    metrics.update(
        {
            "cl_frac_max": cmax,
            "cl_frac_mean": cmean,
            "peaks_frac_max": pmax,
            "peaks_frac_mean": pmean,
            "pdf_frac_max": dmax,
            "pdf_frac_mean": dmean,
            "std_ratio": float(s.std() / ref.std()) if ref.std() > 0 else float("nan"),
        }
    )
    bins = {
        "ell": np.asarray(ell),
        "cl_ref": cl_r.mean(0),
        "cl_sample": cl_s.mean(0),
        "cl_frac": cfrac,
        "peak_edges": peak_edges,
        "peaks_ref": pk_r.mean(0),
        "peaks_sample": pk_s.mean(0),
        "peaks_frac": pfrac,
        "pdf_edges": pdf_edges,
        "pdf_ref": pdf_r.mean(0),
        "pdf_sample": pdf_s.mean(0),
        "pdf_frac": dfrac,
        "smoothing_arcmin": sig,
    }
    figures: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures = _plots(ref, s, bins, mm, out, tag)
        with open(out / f"{tag}.json", "w") as f:
            json.dump(_jsonable({"metrics": metrics, "bins": bins}), f, indent=1)
    return {
        "metrics": metrics,
        "figures": figures,
        "bins": bins,
        "samples": samples if keep_samples else None,
    }


def _plots(
    ref: np.ndarray, samp: np.ndarray, bins: Mapping[str, Any], mm: Mapping[str, Any], out: Path, tag: str
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figs: dict[str, Path] = {}
    k = min(6, ref.shape[0], samp.shape[0])
    lo, hi = np.quantile(ref[:k, 0], [0.005, 0.995])
    fig, axes = plt.subplots(2, k, figsize=(2.0 * k, 4.3), squeeze=False)
    for j in range(k):
        for r, (arr, name) in enumerate(((ref, "validation"), (samp, "Glow sample"))):
            ax = axes[r, j]
            ax.imshow(arr[j, 0], origin="lower", cmap="inferno", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    side = mm["npix"] * mm["pixel_arcmin"] / 60.0
    fig.suptitle(f"κ maps ({side:.2f}° side, channel 0), {tag}")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=0.9, wspace=0.05, hspace=0.05)
    figs["maps"] = out / f"{tag}_maps.png"
    fig.savefig(figs["maps"], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    ell = np.asarray(bins["ell"])
    cl_r, cl_s = (
        np.asarray(bins["cl_ref"]).reshape(-1, ell.size),
        np.asarray(bins["cl_sample"]).reshape(-1, ell.size),
    )
    w = ell * (ell + 1) / (2 * np.pi)
    for c in range(cl_r.shape[0]):
        axes[0, 0].loglog(ell, w * cl_r[c], "k-", label="validation" if c == 0 else None)
        axes[0, 0].loglog(ell, w * cl_s[c], "C1--", label="Glow" if c == 0 else None)
        axes[1, 0].semilogx(ell, cl_s[c] / cl_r[c] - 1, "C1-")
    axes[0, 0].set_ylabel(r"$\ell(\ell+1)C_\ell/2\pi$")
    axes[1, 0].set_xlabel(r"$\ell$")
    for col, (key, xlabel) in enumerate((("peaks", "peak height κ"), ("pdf", "κ"))):
        e = np.asarray(bins[f"{key}_edges" if key == "pdf" else "peak_edges"])
        mid = 0.5 * (e[1:] + e[:-1])
        r = np.asarray(bins[f"{key}_ref"]).reshape(-1, mid.size)
        s = np.asarray(bins[f"{key}_sample"]).reshape(-1, mid.size)
        for c in range(r.shape[0]):
            axes[0, col + 1].semilogy(mid, r[c], "k-", label="validation" if c == 0 else None)
            axes[0, col + 1].semilogy(mid, s[c], "C1--", label="Glow" if c == 0 else None)
            with np.errstate(divide="ignore", invalid="ignore"):
                axes[1, col + 1].plot(mid, np.where(r[c] > 0, s[c] / r[c] - 1, np.nan), "C1-")
        axes[1, col + 1].set_xlabel(xlabel)
    axes[0, 1].set_ylabel(f"peaks per map (σ_s={bins['smoothing_arcmin']:.2g}')")
    axes[0, 2].set_ylabel("pixel PDF")
    for ax in axes[1]:
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-0.5, 0.5)
    axes[1, 0].set_ylabel("fractional error")
    axes[0, 0].legend()
    fig.suptitle(f"Glow samples vs validation maps, {tag}")
    # fixed margins: tight_layout costs seconds per figure, which adds up in checks
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.08, top=0.93, wspace=0.28, hspace=0.06)
    figs["stats"] = out / f"{tag}_stats.png"
    fig.savefig(figs["stats"], dpi=90)
    plt.close(fig)
    return figs
