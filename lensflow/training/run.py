"""``train(cfg)``: build the run from its config once, fit, check the best checkpoint, return the paths.

Everything lands in the run folder (Hydra's output folder, or ``paths.run_dir``): ``checkpoints/best.ckpt``
(lowest validation bits/dim of the EMA weights), ``checkpoints/last.ckpt``, ``checks/`` (in-training sample
checks: JSON + PNG), ``samples.h5`` (maps drawn from the best checkpoint, a map store), ``summary.json`` and
``final_*.png`` (those samples against the validation maps), and the logger's files (``wandb/`` or
``csv/``). Data: ``data.path`` names a map store; when it is null the store described by
``data.simulate`` is simulated once into ``${paths.data_dir}`` (cached under a hash of the spec).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from lensflow._util.atomic import write_json
from lensflow._util.plain import to_plain
from lensflow.checkpoint import MODEL_KIND, read_checkpoint, training_maps
from lensflow.mapstore import write_store
from lensflow.model import KappaFlow
from lensflow.provenance import provenance
from lensflow.training.callbacks import Callbacks, make_callbacks
from lensflow.training.checkpoint_io import AtomicCheckpointIO
from lensflow.training.data import KappaDataModule
from lensflow.training.glow_module import GlowModule
from lensflow.training.kl import KLGap, kl_gaps, summary_of
from lensflow.training.loggers import make_logger
from lensflow.training.request import TrainRequest, resolve_store
from lensflow.training.sample_check import full_verdict, sample_check
from lensflow.training.settings import ModelSettings

__all__ = ["check_resume", "train"]

_ARCH_KEYS = (
    "levels",
    "steps",
    "hidden",
    "padding",
    "log_shift",
    "scale_bound",
    "coupling",
    "spline_bins",
    "spline_tail_bound",
    "prior_bound",
    "split_hidden",
    "amplitude_levels",
    "learn_top_prior",
)
_FINAL_SEED_OFFSET = 1_000_003  # the final check's latents differ from every in-training check's


def train(cfg: Any, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train a Glow on the configured κ maps; return paths and the validation summary.

    Args:
        cfg: the composed ``train`` config (``conf/train.yaml``) or a :class:`TrainRequest`.
        callbacks: extra Lightning callbacks (tests, notebooks).

    Returns:
        ``{"run_dir", "best_checkpoint", "last_checkpoint", "samples", "summary_path", "summary",
        "global_step", "store"}`` (paths as strings; on ranks other than 0 only run_dir/checkpoints/step/store;
        with ``prepare_only`` only run_dir/store/n_maps).
    """
    t0 = time.time()
    req = cfg if isinstance(cfg, TrainRequest) else TrainRequest.from_config(cfg)
    store = resolve_store(req.data)
    dm = KappaDataModule(store, **req.data.loader, seed=req.seed)  # validates the store and the data settings
    if req.prepare_only:
        return {"run_dir": str(req.run_dir), "store": str(store), "n_maps": dm.store.n, "prepare_only": True}
    module = GlowModule(
        model=req.model,
        meta=dm.meta,
        npix=dm.npix,
        store=dm.store_path,
        param_names=dm.param_names,
        optim=req.optim,
        check=req.check,
        seed=req.seed,
        config=req.config,
    )
    ckpt_path = check_resume(req.ckpt_path, module) if req.ckpt_path else None
    if ckpt_path is None:
        module.model.fit_normalization(
            dm.normalization_maps(),
            *dm.cond_stats(log=module.model.cond_log),
            params=dm.normalization_params(),
            box=dm.cond_box(),
        )
    L.seed_everything(req.seed, workers=True, verbose=False)
    cbs = make_callbacks(req.callbacks, req.check, req.seed, req.run_dir, req.trainer.get("enable_progress_bar", True))
    req.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = _fit(req, module, dm, cbs, [*callbacks], ckpt_path)
    best = Path(cbs.best.best_model_path) if cbs.best.best_model_path else None
    last = req.run_dir / "checkpoints" / "last.ckpt"
    result: dict[str, Any] = {
        "run_dir": str(req.run_dir),
        "best_checkpoint": str(best) if best else None,
        "last_checkpoint": str(last) if last.exists() else None,
        "global_step": int(trainer.global_step),
        "store": str(store),
    }
    if not trainer.is_global_zero:
        return result
    src = best if best and best.exists() else (last if last.exists() else None)
    final = None
    if req.check.final and src is not None and req.check.n_samples > 0:
        final = _final_check(req, dm, src, trainer.strategy.root_device, _kl_monitor(cbs))
    summary = train_summary(req, result, trainer, cbs, module, final, time.time() - t0)
    summary_path = write_json(req.run_dir / "summary.json", to_plain(summary, nan_to_none=True))
    result.update({"samples": summary.get("samples"), "summary_path": str(summary_path), "summary": summary})
    return result


class _NoAdvert(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger" line: an advert, not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


def _fit(
    req: TrainRequest,
    module: GlowModule,
    dm: KappaDataModule,
    cbs: Callbacks,
    extra: list[Callback],
    ckpt_path: Path | None,
) -> L.Trainer:
    with warnings.catch_warnings():
        # Our sampler/DataModule state make mid-epoch resumes exact; ModelCheckpoint's warning about
        # manual optimization concerns models that save pre-step states, which this one does not.
        warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
        # Lightning's own data-loader code (CombinedLoader) builds torch's deprecated LeafSpec: not ours to fix.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer = L.Trainer(
            **req.trainer,
            logger=make_logger(req.logger, req.name, req.run_dir),
            callbacks=[*cbs.all, *extra],
            default_root_dir=str(req.run_dir),
            use_distributed_sampler=False,
            plugins=[AtomicCheckpointIO()],  # a full disk never leaves a truncated checkpoint under its name
        )
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


def check_resume(ckpt_path: Path, module: GlowModule) -> Path:
    """A checkpoint to resume from must be a lensflow Glow checkpoint of the same architecture and data."""
    p = Path(ckpt_path).expanduser()
    hp = read_checkpoint(p, mmap=True)["hyper_parameters"]  # one-line ValueError if foreign; tensors not read
    try:
        theirs = ModelSettings.from_config(hp.get("model"))
        meta, npix, _ = training_maps(hp)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ckpt_path={p}: checkpoint of another lensflow ({e})") from None
    ours = ModelSettings.from_config(module.hparams["model"])
    diffs = [
        f"model.{k}={getattr(theirs, k)!r} in the checkpoint, {getattr(ours, k)!r} here"
        for k in _ARCH_KEYS
        if getattr(theirs, k) != getattr(ours, k)
    ]
    for k, a, b in (("channels", meta.channels, module.meta.channels), ("npix", npix, module.npix)):
        if a != b:
            diffs.append(f"maps {k}={a!r} in the checkpoint, {b!r} here")
    if list(hp.get("param_names", [])) != list(module.param_names):
        diffs.append(f"cond {hp.get('param_names')} in the checkpoint, {list(module.param_names)} here")
    if diffs:
        raise ValueError(f"ckpt_path={p}: checkpoint of another model: " + "; ".join(diffs))
    return p.resolve()


def _kl_monitor(cbs: Callbacks) -> KLGap | None:
    return next((c for c in cbs.all if isinstance(c, KLGap)), None)


def _final_check(
    req: TrainRequest, dm: KappaDataModule, src: Path, device: Any, kl: KLGap | None = None
) -> dict[str, Any]:
    """The sample check of checkpoint ``src`` (its samples go to ``<run_dir>/samples.h5``), validate's full
    default verdict on the same samples, and the checkpoint's KL gaps when the store has an exact likelihood."""
    model = KappaFlow.load(src, device)
    ref, ref_params = dm.eval_maps("val", req.check.n_samples)
    groups = dm.eval_groups("val", req.check.n_samples)
    res = sample_check(
        model,
        ref,
        ref_params,
        ref_groups=groups,
        check=req.check,
        seed=req.seed + _FINAL_SEED_OFFSET,
        out_dir=req.run_dir,
        tag="final",
        device=device,
        keep_samples=True,
    )
    path = req.run_dir / "samples.h5"
    write_samples(path, res["samples"], ref_params, model, src, req.config)
    verdict = full_verdict(ref, res["samples"], model.meta, req.seed + _FINAL_SEED_OFFSET, groups)
    gaps = kl_gaps(model, kl.sets) if kl is not None and kl.sets is not None else None
    return {
        **res,
        "sampled_from": str(src),
        "samples": str(path),
        "n_reference_maps": int(ref.shape[0]),
        "validate": verdict,
        "kl": summary_of(gaps, None if kl is None else kl.unavailable or "off (check.kl_maps=0)"),
    }


def write_samples(
    path: Path, samples: np.ndarray, params: np.ndarray, module: KappaFlow, ckpt: Path, config: Mapping[str, Any]
) -> Path:
    """The finite ``samples`` as a mock map store (test split), conditions and provenance included."""
    good = np.isfinite(samples).reshape(samples.shape[0], -1).all(axis=1)
    meta = dataclasses.replace(
        module.meta,
        kind="mock",
        param_names=tuple(module.param_names),
        created_by=provenance(config),
        extra={
            "generated_by": MODEL_KIND,
            "checkpoint": str(ckpt),
            "training_store": module.store,
            "purpose": "end-of-training check samples (temperature 1, conditions of the validation maps)",
        },
    )
    p = params[good] if module.param_names else None
    split = np.full(int(good.sum()), 2)
    return write_store(path, samples[good].astype(np.float32), meta, params=p, split=split, overwrite=True)


def train_summary(
    req: TrainRequest,
    result: Mapping[str, Any],
    trainer: L.Trainer,
    cbs: Callbacks,
    module: GlowModule,
    final: Mapping[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """What ``summary.json`` holds: the run's paths and steps, the best validation bits/dim, the final check."""
    score = cbs.best.best_model_score
    summary: dict[str, Any] = {
        "run_dir": result["run_dir"],
        "store": result["store"],
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": result["best_checkpoint"],
        "last_checkpoint": result["last_checkpoint"],
        "best_val_bits_per_dim": None if score is None else float(score),
        "skipped_steps": int(module.nonfinite_total),
        "train_seconds": round(seconds, 1),
    }
    if final is not None:
        summary.update(
            {
                "sampled_from": final["sampled_from"],
                "samples": final["samples"],
                "n_reference_maps": final["n_reference_maps"],
                "check": final["metrics"],
                "validate": final["validate"],
                "kl": final["kl"],
                "figures": dict(final["figures"]),
            }
        )
    return summary
