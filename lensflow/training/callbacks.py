"""The run's callbacks from ``conf/callbacks``: best/last checkpoints, the final ``last.ckpt``, progress bar,
the DDP parameter digest, the sample check, and extra callbacks instantiated from config."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from lensflow._util.atomic import write_json
from lensflow._util.checks import check_bool, check_int, check_optional_int
from lensflow._util.plain import merge, to_plain
from lensflow.training.kl import KLGap
from lensflow.training.sample_check import SampleCheck
from lensflow.training.settings import CheckSettings

__all__ = ["DEFAULTS", "CallbackSettings", "Callbacks", "FinalLast", "ParamDigest", "make_callbacks"]

#: The ``callbacks`` node's keys and defaults (``conf/callbacks/default.yaml`` takes it, :mod:`lensflow.confstore`).
#: Checkpoints go to ``<run_dir>/checkpoints/``: ``best.ckpt`` (lowest validation bits/dim of the EMA weights) and
#: ``last.ckpt`` (every ``last_every_n_steps`` optimizer steps, or after every epoch if null, and at the end).
DEFAULTS: dict[str, Any] = {
    "checkpoint": {
        "monitor": "val/bits_per_dim",  # the metric best.ckpt minimises
        "last_every_n_steps": 500,  # null = only after epochs and at the end
    },
    "progress_bar_refresh_rate": 10,  # steps between progress-bar updates
    # hash every rank's parameters at the end, gather them, write <run_dir>/param_digest.json and fail if the
    # ranks differ (DDP sync check)
    "param_digest": False,
    "extra": {},  # more callbacks as {name: {_target_: ..., ...}} (hydra.utils.instantiate)
}


@dataclass(frozen=True)
class CallbackSettings:
    """``checkpoint.monitor``, ``checkpoint.last_every_n_steps`` (``None``: after epochs and at the end),
    ``progress_bar_refresh_rate``, ``param_digest`` and ``extra`` (``{name: {_target_: ...}}``); build it with
    :meth:`from_config` (the keys left out take :data:`DEFAULTS`)."""

    monitor: str
    last_every_n_steps: int | None
    progress_bar_refresh_rate: int
    param_digest: bool
    extra: Mapping[str, Any]

    def __post_init__(self) -> None:
        check_optional_int("callbacks.checkpoint.last_every_n_steps", self.last_every_n_steps, 1)
        check_int("callbacks.progress_bar_refresh_rate", self.progress_bar_refresh_rate, 1)
        check_bool("callbacks.param_digest", self.param_digest)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> CallbackSettings:
        """From a ``callbacks`` node (``conf/callbacks/default.yaml``)."""
        given = dict(to_plain(node) or {})
        unknown = sorted(set(given) - set(DEFAULTS))
        unknown += sorted(f"checkpoint.{k}" for k in set(given.get("checkpoint") or {}) - set(DEFAULTS["checkpoint"]))
        if unknown:
            raise ValueError(f"callbacks: unknown keys {unknown}")
        d = merge(DEFAULTS, given)
        ck = d.pop("checkpoint")
        return cls(**ck, **{k: v for k, v in d.items() if k != "extra"}, extra=dict(d["extra"] or {}))


class ParamDigest(Callback):
    """At the end of training, hash every rank's parameters and buffers, gather the digests on all ranks,
    write them to ``<run_dir>/param_digest.json`` (rank 0) and fail if the ranks disagree."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def digest(module: torch.nn.Module) -> bytes:
        h = hashlib.sha256()
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = [*self.digest(pl_module), os.getpid()]
        every = trainer.strategy.all_gather(torch.tensor(mine, dtype=torch.int64, device=pl_module.device))
        every = every.reshape(-1, len(mine)).cpu().numpy()  # [world, 33]
        digests = [bytes(int(b) for b in row[:-1]).hex() for row in every]
        if trainer.is_global_zero:
            record = {
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "digests": digests,
                "pids": [int(r[-1]) for r in every],
            }
            write_json(self.path, record)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different parameters after training: {digests}")


class FinalLast(Callback):
    """Write ``last.ckpt`` at the end of training when the periodic saves missed the final step."""

    def __init__(self, last: ModelCheckpoint, path: Path) -> None:
        self.last = last
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last._last_global_step_saved != trainer.global_step or not self.path.exists():
            trainer.save_checkpoint(self.path, weights_only=False)
            self.last._last_global_step_saved = trainer.global_step


@dataclass
class Callbacks:
    """The callback list and the two checkpoint callbacks the run reads back."""

    all: list[Callback]
    best: ModelCheckpoint
    last: ModelCheckpoint


def make_callbacks(
    settings: CallbackSettings, check: CheckSettings, seed: int, run_dir: Path, progress_bar: bool
) -> Callbacks:
    """The run's callbacks, writing into ``run_dir``."""
    ckpt_dir = run_dir / "checkpoints"
    every = settings.last_every_n_steps
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=settings.monitor,
        mode="min",
        save_top_k=1,
        save_last=False,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        monitor=None,
        save_top_k=1,
        save_last=False,
        every_n_train_steps=every,
        every_n_epochs=None if every else 1,
        enable_version_counter=False,
    )
    out: list[Callback] = [best, last, FinalLast(last, ckpt_dir / "last.ckpt")]
    if check.every > 0:
        out.append(SampleCheck(check, seed))
    if check.kl_maps > 0 or check.kl_train_maps > 0:
        out.append(KLGap(check.kl_maps, check.kl_train_maps))
    if progress_bar:
        out.append(TQDMProgressBar(refresh_rate=settings.progress_bar_refresh_rate))
    if settings.param_digest:
        out.append(ParamDigest(run_dir / "param_digest.json"))
    for name, node in settings.extra.items():
        if node:
            import hydra

            try:
                out.append(hydra.utils.instantiate(node))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"callbacks.extra.{name}: cannot instantiate ({e})") from None
    return Callbacks(out, best, last)
