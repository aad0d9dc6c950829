"""Train a Glow emulator of κ maps: ``python -m lensflow.train [+experiment=NAME] [key=value ...]``.

::

    python -m lensflow.train +experiment=kappa_quick                 # CPU, < 10 min, simulates its data
    python -m lensflow.train +experiment=kappa                       # reference run, DDP over all GPUs
    python -m lensflow.train data.path=maps.h5 model.steps=8 trainer.max_steps=100
    python -m lensflow.train +experiment=kappa ckpt_path=<run>/checkpoints/last.ckpt   # resume exactly

Everything lands in the run folder (Hydra's output folder, or ``paths.run_dir``):
``checkpoints/best.ckpt`` (lowest validation bits/dim of the EMA weights), ``checkpoints/last.ckpt``,
``checks/`` (in-training sample checks: JSON + PNG), ``samples.h5`` (maps drawn from the best checkpoint,
a map store), ``summary.json`` and ``final_*.png`` (statistics of those samples against the validation
maps), and the logger's files (``wandb/`` or ``csv/``).

Data: ``data.path`` names a map store, used as it is. When it is null, the store described by
``data.simulate`` is simulated once by :func:`lensflow.simulate.ensure_simulated` into
``${paths.data_dir}`` (cached under a hash of the spec, so later runs reuse it). Under several processes
a file lock makes one simulate while the others wait.

Bad input (missing store, wrong schema, a checkpoint of another model, a config typo, a bad value) ends
with one line ``error: ...`` on stderr and exit code 2; a diverging run (non-finite losses) with exit code 1.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lensflow.cli import one_line, precheck
from lensflow.data import KappaDataModule
from lensflow.mapstore import MapStoreError, StoreMeta, write_store
from lensflow.module import (
    MODEL_KIND,
    GlowModule,
    NonFiniteCheckpointError,
    TrainingDivergedError,
    load_glow_module,
    read_checkpoint,
    sample_check,
)
from lensflow.provenance import _jsonable, provenance

__all__ = ["train", "main", "resolve_store", "ParamDigest"]

_ARCH_KEYS = (
    "levels",
    "steps",
    "hidden",
    "padding",
    "log_shift",
    "scale_bound",
    "prior_bound",
    "learn_top_prior",
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``: one process at a time simulates a store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_store(data: Mapping[str, Any], data_dir: str | os.PathLike) -> Path:
    """The map store to train on: ``data.path`` if set, else the cached simulation of ``data.simulate``."""
    path = data.get("path")
    if path not in (None, ""):
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise MapStoreError(f"{p}: map store not found (data.path; null simulates the default store)")
        return p.resolve()
    if not data.get("simulate_if_missing", True):
        raise ValueError(
            "data.path is null and data.simulate_if_missing=false: name a map store with "
            "data.path=... or allow the simulation"
        )
    spec = data.get("simulate")
    if not spec:
        raise ValueError("data.path is null and there is no data.simulate spec to simulate a store from")
    try:
        from lensflow.simulate import ensure_simulated
    except ImportError as e:  # pragma: no cover - only while the simulation layer is missing
        raise ValueError(f"data.path is null but the simulation layer is unavailable ({e})") from None
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    cache = Path(str(data_dir)).expanduser().resolve()
    with _file_lock(cache / ".simulate.lock"):
        return Path(ensure_simulated(spec, cache)).resolve()


def _datamodule(cfg: DictConfig, store: Path) -> KappaDataModule:
    d = cfg.data
    return KappaDataModule(
        store,
        batch_size=d.batch_size,
        eval_batch_size=d.get("eval_batch_size"),
        num_workers=d.num_workers,
        in_memory=d.in_memory,
        augment=d.augment,
        translations=d.translations,
        cond=list(d.cond) if d.get("cond") else None,
        max_train_maps=d.get("max_train_maps"),
        max_val_maps=d.get("max_val_maps"),
        max_test_maps=d.get("max_test_maps"),
        norm_maps=d.norm_maps,
        seed=int(cfg.seed),
        pin_memory=d.get("pin_memory", "auto"),
    )


# --------------------------------------------------------------------------------------------
# Run folder, trainer, logger, callbacks
# --------------------------------------------------------------------------------------------


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.paths.get("run_dir"):
        return Path(str(cfg.paths.run_dir)).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (Path(str(cfg.paths.output_dir)) / "train" / str(cfg.name) / stamp).expanduser().resolve()


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
        mine = list(self.digest(pl_module)) + [os.getpid()]
        mine = torch.tensor(mine, dtype=torch.int64, device=pl_module.device)
        every = trainer.strategy.all_gather(mine)
        every = every.reshape(-1, mine.numel()).cpu().numpy()  # [world, 33]
        digests = [bytes(int(b) for b in row[:-1]).hex() for row in every]
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(
                    {
                        "world_size": trainer.world_size,
                        "global_step": trainer.global_step,
                        "digests": digests,
                        "pids": [int(r[-1]) for r in every],
                    },
                    f,
                    indent=1,
                )
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different parameters after training: {digests}")


class _FinalLast(Callback):
    """Write ``last.ckpt`` at the end of training when the periodic saves missed the final step."""

    def __init__(self, last: ModelCheckpoint, path: Path) -> None:
        self.last = last
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last._last_global_step_saved != trainer.global_step or not self.path.exists():
            trainer.save_checkpoint(self.path, weights_only=False)
            self.last._last_global_step_saved = trainer.global_step


def _wandb_mode(offline: bool | None) -> str:
    if offline is True:
        return "offline"
    if offline is False:
        return "online"
    return os.environ.get("WANDB_MODE") or "offline"


def _logger(cfg: DictConfig, run_dir: Path) -> Any:
    lg = cfg.get("logger")
    if not lg or lg.get("kind") in (None, "none"):
        return False
    kind = lg.kind
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = _wandb_mode(lg.get("offline"))
        return WandbLogger(
            name=str(cfg.name),
            save_dir=str(run_dir),
            project=lg.get("project") or "lensflow",
            entity=lg.get("entity"),
            offline=mode in ("offline", "dryrun"),
            mode=mode,
            tags=list(lg.get("tags") or []),
            log_model=bool(lg.get("log_model", False)),
        )
    raise ValueError(f"logger.kind must be wandb, csv or none, got {kind!r}")


def _callbacks(cfg: DictConfig, run_dir: Path) -> tuple[list[Callback], ModelCheckpoint, ModelCheckpoint]:
    cb = cfg.callbacks
    ckpt_dir = run_dir / "checkpoints"
    every = cb.checkpoint.get("last_every_n_steps")
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=cb.checkpoint.monitor,
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
        every_n_train_steps=int(every) if every else None,
        every_n_epochs=None if every else 1,
        enable_version_counter=False,
    )
    out: list[Callback] = [best, last, _FinalLast(last, ckpt_dir / "last.ckpt")]
    if cfg.trainer.get("enable_progress_bar", True):
        out.append(TQDMProgressBar(refresh_rate=int(cb.get("progress_bar_refresh_rate", 10))))
    if cb.get("param_digest"):
        out.append(ParamDigest(run_dir / "param_digest.json"))
    for name, node in (cb.get("extra") or {}).items():
        if node:
            try:
                out.append(hydra.utils.instantiate(node))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"callbacks.extra.{name}: cannot instantiate ({e})") from None
    return out, best, last


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(t, dict)
    if isinstance(t.get("strategy"), dict):
        t["strategy"] = hydra.utils.instantiate(cfg.trainer.strategy)
    prec = str(t.get("precision", "32-true"))
    if prec in ("16", "16-mixed", "16-true"):
        raise ValueError(
            f"trainer.precision={prec}: fp16 is not supported (its loss scaling clashes with the "
            "non-finite step guard); use bf16-mixed on GPUs or 32-true"
        )
    acc = str(t.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={acc} but no CUDA GPU is visible; use trainer=cpu or ddp_cpu")
    return t


# --------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------


def _check_resume(ckpt_path: str, module: GlowModule) -> Path:
    """A checkpoint to resume from must be a lensflow Glow checkpoint of the same architecture and data."""
    p = Path(str(ckpt_path)).expanduser()
    ckpt = read_checkpoint(p)  # one-line ValueError if missing or not a lensflow Glow checkpoint
    hp = ckpt["hyper_parameters"]
    ours = module.hparams
    diffs = []
    for k in _ARCH_KEYS:
        a, b = hp.get("model", {}).get(k), ours["model"].get(k)
        if a != b:
            diffs.append(f"model.{k}={a!r} in the checkpoint, {b!r} here")
    for k in ("channels", "npix"):
        a, b = hp.get("map_meta", {}).get(k), ours["map_meta"].get(k)
        if a != b:
            diffs.append(f"maps {k}={a!r} in the checkpoint, {b!r} here")
    if list(hp.get("param_names", [])) != list(ours["param_names"]):
        diffs.append(f"cond {hp.get('param_names')} in the checkpoint, {ours['param_names']} here")
    if diffs:
        raise ValueError(f"ckpt_path={p}: checkpoint of another model: " + "; ".join(diffs))
    return p.resolve()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _pos(name: str, v: Any, allow_zero: bool = False, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    ok = (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v >= 0 if allow_zero else v > 0)
    )
    if not ok:
        raise ValueError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} number"
            f"{' or null' if allow_none else ''}, got {v!r}"
        )


def _check_config(cfg: DictConfig) -> None:
    """Cheap checks of the values that otherwise fail late (after a simulation or deep in Lightning)."""
    m, o, d, c = cfg.model, cfg.optim, cfg.data, cfg.check
    if m.get("kind", MODEL_KIND) != MODEL_KIND:
        raise ValueError(f"model.kind must be {MODEL_KIND!r}, got {m.kind!r}")
    levels = _int("model.levels", m.levels)
    _int("model.steps", m.steps)
    _int("model.hidden", m.hidden)
    if m.get("cond_dim") is not None:
        _int("model.cond_dim", m.cond_dim, 0)
    if m.get("padding", "auto") not in ("auto", "zero", "circular"):
        raise ValueError(f"model.padding must be auto, zero or circular, got {m.padding!r}")
    _pos("optim.lr", o.lr)
    _pos("optim.weight_decay", o.weight_decay, allow_zero=True)
    _int("optim.warmup_steps", o.warmup_steps, 0)
    _pos("optim.grad_clip", o.get("grad_clip"), allow_none=True)
    _int("optim.max_nonfinite_steps", o.max_nonfinite_steps)
    if not (isinstance(o.ema_decay, (int, float)) and 0 <= o.ema_decay < 1):
        raise ValueError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay!r}")
    if not (isinstance(o.min_lr_ratio, (int, float)) and 0 <= o.min_lr_ratio <= 1):
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    _int("check.every", c.every, 0)
    _int("check.n_samples", c.n_samples, 0)
    _int("check.n_bins", c.n_bins, 2)
    _int("check.batch_size", c.batch_size)
    _pos("check.temperature", c.temperature)
    _pos("check.smoothing_arcmin", c.get("smoothing_arcmin"), allow_zero=True, allow_none=True)
    if OmegaConf.is_missing(d, "path"):
        raise ValueError("data.path: name the map store to train on (data.path=/path/to/maps.h5)")
    if d.get("path") in (None, "") and d.get("simulate"):
        npix = d.simulate.get("npix")
        if isinstance(npix, int) and npix % (2**levels):
            raise ValueError(f"data.simulate.npix={npix} is not divisible by 2**model.levels = {2**levels}")


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train a Glow on the configured κ maps; return paths and the validation summary.

    Args:
        cfg: the composed ``train`` config (``conf/train.yaml``).
        callbacks: extra Lightning callbacks (tests, notebooks).

    Returns:
        ``{"run_dir", "best_checkpoint", "last_checkpoint", "samples", "summary_path", "summary",
        "global_step", "store"}`` (paths as strings; on ranks other than 0 only run_dir/checkpoints/step).
    """
    t0 = time.time()
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was (paths.run_dir is filled in below)
    run_dir = _run_dir(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    _int("seed", cfg.seed, 0)
    _check_config(cfg)
    trainer_kw = _trainer_kwargs(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    store = resolve_store(cfg.data, cfg.paths.data_dir)
    if cfg.get("prepare_only"):
        dm = _datamodule(cfg, store)  # validates the store and the data settings
        print(f"lensflow.train: training store ready: {store} ({dm.store.n} maps)", flush=True)
        return {"run_dir": str(run_dir), "store": str(store)}
    dm = _datamodule(cfg, store)
    module = GlowModule(
        model=cfg.model,
        map_meta=dm.map_meta(),
        param_names=dm.param_names,
        optim=cfg.optim,
        check=cfg.check,
        seed=int(cfg.seed),
        config=resolved,
    )
    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path = _check_resume(cfg.ckpt_path, module)
    else:
        mean, std = dm.cond_stats()
        module.fit_normalization(dm.normalization_maps(), mean, std)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    cbs, best_cb, last_cb = _callbacks(cfg, run_dir)
    logger = _logger(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Our sampler/DataModule state make mid-epoch resumes exact; ModelCheckpoint's warning about
        # manual optimization concerns models that save pre-step states, which this one does not.
        warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
        trainer = L.Trainer(
            **trainer_kw,
            logger=logger,
            callbacks=[*cbs, *callbacks],
            default_root_dir=str(run_dir),
            use_distributed_sampler=False,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)

    ckpt_dir = run_dir / "checkpoints"
    best = Path(best_cb.best_model_path) if best_cb.best_model_path else None
    last = ckpt_dir / "last.ckpt"
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(best) if best else None,
        "last_checkpoint": str(last) if last.exists() else None,
        "global_step": int(trainer.global_step),
        "store": str(store),
    }
    if not trainer.is_global_zero:
        return result

    best_score = best_cb.best_model_score
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "store": str(store),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": result["best_checkpoint"],
        "last_checkpoint": result["last_checkpoint"],
        "best_val_bits_per_dim": None if best_score is None else float(best_score),
        "skipped_steps": int(module.nonfinite_total),
        "train_seconds": round(time.time() - t0, 1),
    }
    samples_path = None
    chk = cfg.check
    src = best if best and best.exists() else (last if last.exists() else None)
    if chk.get("final", True) and src is not None and int(chk.n_samples) > 0:
        final = load_glow_module(src, map_location="cpu")
        dev = trainer.strategy.root_device
        final = final.to(dev)
        ref, ref_params = dm.eval_maps("val", int(chk.n_samples))
        res = sample_check(
            final,
            ref,
            ref_params,
            check=OmegaConf.to_container(chk, resolve=True),
            seed=int(cfg.seed) + 1_000_003,
            out_dir=run_dir,
            tag="final",
            device=dev,
            keep_samples=True,
        )
        samples_path = run_dir / "samples.h5"
        _write_samples(samples_path, res["samples"], ref_params, final, src, resolved)
        summary.update(
            {
                "sampled_from": str(src),
                "samples": str(samples_path),
                "n_reference_maps": int(ref.shape[0]),
                "check": res["metrics"],
                "figures": {k: str(v) for k, v in res["figures"].items()},
            }
        )
    summary_path = run_dir / "summary.json"
    with open(summary_path, "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    result.update(
        {
            "samples": str(samples_path) if samples_path else None,
            "summary_path": str(summary_path),
            "summary": summary,
        }
    )
    _print_summary(summary, summary_path)
    return result


def _write_samples(
    path: Path, samples: np.ndarray, params: np.ndarray, module: GlowModule, ckpt: Path, config: Any
) -> None:
    mm = module.map_meta
    good = np.isfinite(samples).reshape(samples.shape[0], -1).all(axis=1)
    meta = StoreMeta(
        pixel_arcmin=float(mm["pixel_arcmin"]),
        source_redshifts=tuple(float(z) for z in mm["source_redshifts"]),
        periodic=bool(mm.get("periodic", False)),
        kind="mock",
        param_names=tuple(module.param_names),
        created_by=provenance(config),
        extra={
            "generated_by": MODEL_KIND,
            "checkpoint": str(ckpt),
            "training_store": mm.get("store"),
            "purpose": "end-of-training check samples (temperature 1, conditions of the validation maps)",
        },
    )
    p = params[good] if module.param_names else None
    write_store(
        path,
        samples[good].astype(np.float32),
        meta,
        params=p,
        split=np.full(int(good.sum()), 2),
        overwrite=True,
    )


def _fmt(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


def _print_summary(s: Mapping[str, Any], path: Path) -> None:
    lines = ["", f"lensflow.train finished: {s['global_step']} steps in {s['train_seconds']:.0f} s"]
    lines.append(f"  run folder:       {s['run_dir']}")
    lines.append(f"  best checkpoint:  {s['best_checkpoint']}")
    lines.append(f"  last checkpoint:  {s['last_checkpoint']}")
    if s.get("best_val_bits_per_dim") is not None:
        lines.append(f"  best val bits/dim (EMA): {s['best_val_bits_per_dim']:.4f}")
    if s.get("samples"):
        c = s["check"]
        n_ok = int(c["n_samples"] - c["nonfinite_samples"])
        lines.append(f"  samples:          {s['samples']} ({n_ok} maps)")
        n_ref = s["n_reference_maps"]
        lines.append(f"  vs {n_ref} validation maps, |fractional error| max / mean over bins:")
        lines.append(f"    C_ell        {_fmt(c.get('cl_frac_max'))} / {_fmt(c.get('cl_frac_mean'))}")
        lines.append(f"    peak counts  {_fmt(c.get('peaks_frac_max'))} / {_fmt(c.get('peaks_frac_mean'))}")
        lines.append(f"    pixel PDF    {_fmt(c.get('pdf_frac_max'))} / {_fmt(c.get('pdf_frac_mean'))}")
        lines.append(f"  plots:            {', '.join(s.get('figures', {}).values())}")
    lines.append(f"  summary:          {path}")
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@hydra.main(config_path="pkg://lensflow.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except TrainingDivergedError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteCheckpointError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as e:
        if os.environ.get("LENSFLOW_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if isinstance(e, MisconfigurationException) and not os.environ.get("LENSFLOW_DEBUG"):
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        raise


def main() -> None:
    """Console entry point (``python -m lensflow.train``)."""
    precheck("train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
