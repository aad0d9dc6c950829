"""The Lightning module of a Glow emulator of κ maps (:class:`GlowModule`): the training loop.

The loss is the negative log-likelihood of κ in bits per dimension, ``-log2 p(κ) / (C H W)``, of the
continuous density in κ units (the fixed preprocessing's Jacobian included; it can be negative). AdamW with
linear warmup then cosine decay per optimizer step, gradient-norm clipping, and EMA weights (validation,
sampling and generation use them; :mod:`lensflow.training.schedule`). A step whose loss or gradient is
non-finite on any rank is skipped on every rank and counted (``train/skipped_steps``);
``optim.max_nonfinite_steps`` in a row stop the run (:class:`TrainingDivergedError`), and no checkpoint with
NaN/Inf tensors is written. The network comes from :meth:`lensflow.flows.Glow.from_config`, the checkpoint
format from :mod:`lensflow.checkpoint`; the in-training sample check is a callback
(:class:`lensflow.training.sample_check.SampleCheck`). The trained model itself (sampling, scoring, loading) is
:class:`lensflow.model.KappaFlow`, held as :attr:`GlowModule.model`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lensflow._util.plain import to_plain
from lensflow.checkpoint import MODEL_KIND, NonFiniteCheckpointError, lensflow_entry, refuse_nonfinite
from lensflow.conditioning import normalize_conditions
from lensflow.flows import ActNorm, Glow
from lensflow.mapstore import StoreMeta
from lensflow.model import PREFIX as MODEL_PREFIX
from lensflow.model import KappaFlow, ModelSettings, model_state
from lensflow.provenance import provenance
from lensflow.training.schedule import WarmupCosine, ema_decay, ema_update_
from lensflow.training.settings import CheckSettings, OptimSettings

__all__ = ["MODEL_KIND", "GlowModule", "NonFiniteCheckpointError", "TrainingDivergedError"]


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses/gradients in a row: the run cannot continue."""

    exit_code = 1


class GlowModule(L.LightningModule):
    """The training loop of a :class:`~lensflow.model.KappaFlow` (held as :attr:`model`): optimiser, schedule, EMA
    updates, the non-finite guard, validation metrics and the checkpoint entries.

    Args:
        model: :class:`~lensflow.model.ModelSettings` or a (partial) mapping of its fields.
        meta: the training store's :class:`~lensflow.mapstore.StoreMeta` (or its ``to_dict()``): pixel
            scale, source redshifts (one per channel), periodicity.
        npix: map side in pixels.
        param_names: conditioning parameter names (empty: unconditional).
        optim: :class:`~lensflow.training.settings.OptimSettings` or a (partial) mapping.
        check: :class:`~lensflow.training.settings.CheckSettings` of the run's sample checks (recorded).
        seed: seed of the weight initialisation.
        config: the resolved run config (provenance; plain dict).
        store: path of the training store (provenance).
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
    ) -> None:
        super().__init__()
        self.model = KappaFlow(model, meta, npix, param_names, seed, store)
        self.optim_settings = OptimSettings.from_config(optim)
        self.save_hyperparameters(
            {
                **self.model.hyper_parameters(),
                "optim": self.optim_settings.to_dict(),
                "check": CheckSettings.from_config(check).to_dict(),
                "config": to_plain(config),
            }
        )
        self.automatic_optimization = False
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._init_done = False
        self._provenance: dict[str, Any] | None = None

    # -- the model's description, for the loop and its callbacks ------------------------------------------
    @property
    def glow(self) -> Glow:
        """The raw (trained) weights' Glow."""
        return self.model.glow

    @property
    def meta(self) -> StoreMeta:
        return self.model.meta

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.model.param_names

    @property
    def npix(self) -> int:
        return self.model.npix

    @property
    def store(self) -> str | None:
        return self.model.store

    def _batch_cond(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        m = self.model
        if not m.param_names:
            return None
        return normalize_conditions(batch["cond"], m.cond_mean, m.cond_std, log=m.cond_log)

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
        self.model.initialize(x, cond)
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
        ema_update_(self.model.glow_ema.parameters(), self.glow.parameters(), d)
        self.ema_steps += 1
        self.model.glow_ema.clear_cache()

    # -- validation -------------------------------------------------------------------------------------
    def _eval_bits_per_dim(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.model.glow_ema.bits_per_dim(batch["kappa"], self._batch_cond(batch)).mean()

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
        # Lightning loads checkpoint["state_dict"] after this hook: a pre-0.2 checkpoint names the model's
        # entries without the "model." prefix (resuming it then works as before).
        state = checkpoint.get("state_dict")
        if state is not None and not any(k.startswith(MODEL_PREFIX) for k in state):
            checkpoint["state_dict"] = {
                **{MODEL_PREFIX + k: v for k, v in model_state(state).items()},
                **{k: v for k, v in state.items() if k == "ema_steps"},
            }
            for name in ("cond_low", "cond_high"):  # added in 0.2: the box is read from the store, if at all
                checkpoint["state_dict"].setdefault(MODEL_PREFIX + name, getattr(self.model, name).clone())
        counters = checkpoint.get("lensflow_counters", {})
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(counters.get("nonfinite_in_a_row", 0))
