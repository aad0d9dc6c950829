"""The Lightning module of a Glow emulator of κ maps (:class:`GlowModule`): the training loop.

The loss is the negative log-likelihood of κ in bits per dimension, ``-log2 p(κ) / (C H W)``, of the
continuous density in κ units (the fixed preprocessing's Jacobian included; it can be negative). AdamW with
linear warmup then cosine decay per optimizer step, gradient-norm clipping, and EMA weights (validation,
sampling and generation use them; :mod:`lensflow.training.schedule`). A step whose loss or gradient is
non-finite on any rank is skipped on every rank and counted (``train/skipped_steps``);
``optim.max_nonfinite_steps`` in a row stop the run (:class:`TrainingDivergedError`), and no checkpoint with
NaN/Inf tensors is written. The network comes from :meth:`lensflow.flows.Glow.from_config`, the checkpoint
format from :mod:`lensflow.checkpoint`; the in-training sample check is a callback
(:class:`lensflow.training.checks.SampleCheck`). The file runs past 400 lines because the Lightning hooks and
the sampling API must be methods of one class.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lensflow._util.plain import to_plain
from lensflow.checkpoint import (
    MODEL_KIND,
    NonFiniteCheckpointError,
    lensflow_entry,
    read_checkpoint,
    refuse_nonfinite,
    training_maps,
)
from lensflow.conditioning import condition_rows, normalize_conditions
from lensflow.flows import ActNorm, Glow
from lensflow.mapstore import StoreMeta
from lensflow.provenance import provenance
from lensflow.training.schedule import WarmupCosine, ema_decay, ema_update_
from lensflow.training.settings import LEGACY_MODEL, CheckSettings, ModelSettings, OptimSettings

__all__ = [
    "MODEL_KIND",
    "GlowModule",
    "NonFiniteCheckpointError",
    "TrainingDivergedError",
    "load_glow_module",
]


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses/gradients in a row: the run cannot continue."""

    exit_code = 1


class GlowModule(L.LightningModule):
    """A Glow on κ maps with EMA weights, its normalisation and its training loop.

    Args:
        model: :class:`~lensflow.training.settings.ModelSettings` or a (partial) mapping of its fields.
        meta: the training store's :class:`~lensflow.mapstore.StoreMeta` (or its ``to_dict()``): pixel
            scale, source redshifts (one per channel), periodicity.
        npix: map side in pixels.
        param_names: conditioning parameter names (empty: unconditional).
        optim: :class:`~lensflow.training.settings.OptimSettings` or a (partial) mapping.
        check: :class:`~lensflow.training.settings.CheckSettings` of the run's sample checks (recorded).
        seed: seed of the weight initialisation.
        config: the resolved run config (provenance; plain dict).
        store: path of the training store (provenance).
        map_meta: instead of ``meta``/``npix``/``store``, the dict of older checkpoints (``pixel_arcmin,
            source_redshifts, periodic, npix, channels, kind, store``); kept so they still load.
    """

    def __init__(
        self,
        model: ModelSettings | Mapping[str, Any] | None = None,
        meta: StoreMeta | Mapping[str, Any] | None = None,
        npix: int | None = None,
        param_names: Sequence[str] = (),
        optim: OptimSettings | Mapping[str, Any] | None = None,
        check: CheckSettings | Mapping[str, Any] | None = None,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        store: str | os.PathLike | None = None,
        map_meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        meta, npix, store = training_maps(
            {"meta": meta, "npix": npix, "store": None if store is None else str(store), "map_meta": map_meta}
        )
        if map_meta is not None and isinstance(model, Mapping):  # a lensflow 0.1 checkpoint: its own defaults
            model = {**LEGACY_MODEL, **model}
        settings = ModelSettings.from_mapping(model)
        self.optim_settings = OptimSettings.from_mapping(optim)
        names = [str(p) for p in (param_names or ())]
        glow_config = settings.glow_config(meta.channels, npix, len(names), meta.periodic)
        self.save_hyperparameters(
            {
                "model": settings.to_dict(),
                "meta": meta.to_dict(),
                "npix": int(npix),
                "store": store,
                "param_names": names,
                "optim": self.optim_settings.to_dict(),
                "check": CheckSettings.from_mapping(check).to_dict(),
                "seed": int(seed),
                "config": to_plain(config),
            }
        )
        self.automatic_optimization = False
        self.meta = meta
        self.cond_log = settings.cond_log
        self.glow = Glow.from_config(glow_config, init_seed=int(seed))
        self.glow_ema = copy.deepcopy(self.glow)
        self.glow_ema.requires_grad_(False)
        self.register_buffer("cond_mean", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("cond_std", torch.ones(len(names), dtype=torch.float64))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._init_done = False
        self._provenance: dict[str, Any] | None = None

    # -- description ------------------------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Conditioning parameter names (``()`` if unconditional)."""
        return tuple(self.hparams["param_names"])

    @property
    def npix(self) -> int:
        """Map side in pixels."""
        return int(self.hparams["npix"])

    @property
    def store(self) -> str | None:
        """Path of the training store (as it was when training started)."""
        return self.hparams["store"]

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one map."""
        return self.meta.channels, self.npix, self.npix

    @property
    def map_meta(self) -> dict[str, Any]:
        """The old dict description of the training maps (read-only; use :attr:`meta`, :attr:`npix`)."""
        return {
            "pixel_arcmin": self.meta.pixel_arcmin,
            "source_redshifts": list(self.meta.source_redshifts),
            "periodic": self.meta.periodic,
            "npix": self.npix,
            "channels": self.meta.channels,
            "kind": self.meta.kind,
            "store": self.store,
        }

    @property
    def num_dims(self) -> int:
        return self.glow.num_dims

    # -- normalisation ----------------------------------------------------------------------------------
    def fit_normalization(
        self,
        maps: np.ndarray | Tensor,
        cond_mean: Sequence[float] | np.ndarray = (),
        cond_std: Sequence[float] | np.ndarray = (),
        params: np.ndarray | Tensor | None = None,
    ) -> None:
        """Set the cond statistics [P] (of the physical values, or of their logs with ``model.cond_log``), then the
        κ preprocessing (and the stationary layer's whitening) from training maps [N, C, H, W] and their physical
        conditions ``params`` [N, P] (a conditional crop Gaussian fits ξ(θ) on them)."""
        mean = torch.as_tensor(np.asarray(cond_mean, dtype=np.float64).reshape(-1))
        std = torch.as_tensor(np.asarray(cond_std, dtype=np.float64).reshape(-1))
        if mean.numel() != len(self.param_names) or std.numel() != len(self.param_names):
            raise ValueError(f"cond_mean/cond_std must have {len(self.param_names)} entries")
        if not bool(torch.all(std > 0)):
            raise ValueError("cond_std must be positive")
        self.cond_mean.copy_(mean)
        self.cond_std.copy_(std)
        cond = None
        if self.param_names and params is not None:
            cond = normalize_conditions(
                torch.as_tensor(np.asarray(params)), self.cond_mean, self.cond_std, log=self.cond_log
            )
        self.glow.fit_preprocessing(maps, cond)
        self.glow_ema.preprocess.load_state_dict(self.glow.preprocess.state_dict())
        if self.glow.stationary is not None:
            self.glow_ema.stationary.load_state_dict(self.glow.stationary.state_dict())

    def normalize_cond(self, cond: Any, n: int | None = None) -> Tensor | None:
        """Physical conditioning values -> the normalised float32 ``[n, P]`` tensor the Glow takes.

        ``cond``: ``None`` (unconditional models), a tensor/array ``[n, P]`` or ``[P]`` in the order of
        :attr:`param_names`, or a dict ``{name: value or [n] values}`` (see :mod:`lensflow.conditioning`).
        """
        rows = condition_rows(cond, self.param_names, n)
        return normalize_conditions(rows, self.cond_mean, self.cond_std, log=self.cond_log)

    def _batch_cond(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        if not self.param_names:
            return None
        return normalize_conditions(batch["cond"], self.cond_mean, self.cond_std, log=self.cond_log)

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
            step = n if batch_size is None else max(1, min(batch_size, n))
            out = [
                glow.sample(
                    min(step, n - lo),
                    cond=None if c is None else c[lo : lo + step],
                    temperature=temperature,
                    generator=generator,
                    noise=None if noise is None else noise[lo : lo + step],
                )
                for lo in range(0, n, step)
            ]
            return out[0] if len(out) == 1 else torch.cat(out)
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
    def _total_steps(self) -> int:
        """Optimizer steps of this run (``trainer.max_steps``, else Lightning's estimate)."""
        t = self.trainer
        return int(t.max_steps) if t.max_steps and t.max_steps > 0 else int(t.estimated_stepping_batches)

    def configure_optimizers(self) -> Any:
        o = self.optim_settings
        opt = torch.optim.AdamW(
            self.glow.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(o.warmup_steps, self._total_steps(), o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run restores the LR schedule of the checkpoint; stretch its cosine to this run's
        # length, so a resume with a larger trainer.max_steps extends the schedule (a no-op otherwise).
        sched = self.lr_schedulers()
        lam = sched.lr_lambdas[0] if sched is not None else None
        if isinstance(lam, WarmupCosine):
            total = self._total_steps()
            if total != lam.total:
                lam.total = total
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
        loss = self.glow.bits_per_dim(x, c).mean()
        bad_loss = self._any_rank(not bool(torch.isfinite(loss.detach())))
        gnorm = torch.tensor(float("nan"), device=self.device)
        if bad_loss:
            # Every rank still runs a backward that reaches all parameters (zero gradients), so DDP's
            # gradient reduction stays in step across ranks; the optimizer step is then skipped.
            self.manual_backward(sum(p.sum() for p in self.glow.parameters()) * 0.0)
        else:
            self.manual_backward(loss)
            clip = self.optim_settings.grad_clip
            gnorm = torch.nn.utils.clip_grad_norm_(
                self.glow.parameters(), float(clip) if clip else float("inf"), error_if_nonfinite=False
            )
        if bad_loss or not bool(torch.isfinite(gnorm)):  # gradients are all-reduced: same on all ranks
            opt.zero_grad(set_to_none=True)
            self._count_skipped("loss" if bad_loss else "gradient norm")
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.lr_schedulers().step()
            self._update_ema()
            self.nonfinite_in_a_row = 0
        self._log_train(loss, gnorm, x.shape[0], bad_loss, float(opt.param_groups[0]["lr"]))
        return loss.detach()

    def _count_skipped(self, what: str) -> None:
        """Count a skipped step; stop the run after ``max_nonfinite_steps`` in a row."""
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        limit = self.optim_settings.max_nonfinite_steps
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

    def _log_train(self, loss: Tensor, gnorm: Tensor, bs: int, bad_loss: bool, lr: float) -> None:
        """The training metrics of one step."""
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
        self.log("train/grad_norm", gnorm.detach().float(), on_step=True, on_epoch=False, sync_dist=True, batch_size=bs)
        self.log("train/skipped_steps", float(self.nonfinite_total), on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=bs)

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = ema_decay(self.optim_settings.ema_decay, int(self.ema_steps.item()))
        ema_update_(self.glow_ema.parameters(), self.glow.parameters(), d)
        self.ema_steps += 1
        self.glow_ema.clear_cache()

    # -- validation -------------------------------------------------------------------------------------
    def _eval_bits_per_dim(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.glow_ema.bits_per_dim(batch["kappa"], self._batch_cond(batch)).mean()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        bpd = self._eval_bits_per_dim(batch)
        self.log_validation(bpd, batch["kappa"].shape[0])
        return bpd

    def log_validation(self, bits_per_dim: Tensor, batch_size: int) -> None:
        """The validation metrics of one batch (EMA weights): the one place they are logged."""
        self.log(
            "val/bits_per_dim",
            bits_per_dim,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=batch_size,
        )

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        bpd = self._eval_bits_per_dim(batch)
        bs = batch["kappa"].shape[0]
        self.log("test/bits_per_dim", bpd, on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
        return bpd

    # -- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite(checkpoint)
        if self._provenance is None:
            self._provenance = provenance(self.hparams.get("config"))
        checkpoint["lensflow"] = lensflow_entry(
            config=self.hparams.get("config"),
            meta=self.meta,
            npix=self.npix,
            store=self.store,
            param_names=self.param_names,
            provenance=self._provenance,
        )
        checkpoint["lensflow_counters"] = {
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("lensflow_counters", {})
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(counters.get("nonfinite_in_a_row", 0))

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> GlowModule:
        """The module (eval mode, CPU) of a checkpoint dict read by :func:`lensflow.checkpoint.read_checkpoint`;
        a one-line ``ValueError`` naming ``source`` when it does not fit this lensflow's GlowModule."""
        try:
            module = cls(**ckpt["hyper_parameters"])
            module.load_state_dict(ckpt["state_dict"], strict=True)
        except (TypeError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{source}: checkpoint does not match this lensflow's GlowModule "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        module.on_load_checkpoint(dict(ckpt))
        return module.eval()

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> GlowModule:
        """Load a module (eval mode) from a checkpoint file; one-line ``ValueError`` naming the file if it
        is missing or not a lensflow Glow checkpoint."""
        module = cls.from_checkpoint(read_checkpoint(path, "cpu"), path)
        if isinstance(map_location, (str, torch.device)):
            module = module.to(map_location)
        return module


def load_glow_module(path: str | os.PathLike, map_location: Any = "cpu") -> GlowModule:
    """:meth:`GlowModule.load` (the name used before the training package)."""
    return GlowModule.load(path, map_location)
