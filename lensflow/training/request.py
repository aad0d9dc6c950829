"""What ``python -m lensflow.train`` is asked to do: the composed config as typed objects, built once.

:meth:`TrainRequest.from_config` checks every value that would otherwise fail late (after a simulation or
deep inside Lightning) and fills in the run folder; nothing below it reads the config tree again.
:func:`resolve_store` finds (or simulates, under a file lock) the training store.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lensflow._util.checks import check_bool, check_int
from lensflow._util.plain import to_plain
from lensflow.mapstore import MapStoreError
from lensflow.training.callbacks import CallbackSettings
from lensflow.training.loggers import LoggerSettings
from lensflow.training.settings import CheckSettings, ModelSettings, OptimSettings

__all__ = ["DataRequest", "TrainRequest", "resolve_store"]

#: ``data`` keys handed to :class:`lensflow.training.data.KappaDataModule`.
LOADER_KEYS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "in_memory",
    "augment",
    "translations",
    "cond",
    "max_train_maps",
    "max_val_maps",
    "max_test_maps",
    "norm_maps",
    "pin_memory",
)


@dataclass(frozen=True)
class DataRequest:
    """The training data: a store (``path``) or the simulation spec of one, and the loader settings."""

    path: str | None
    simulate: Mapping[str, Any] | None
    simulate_if_missing: bool
    data_dir: Path
    loader: Mapping[str, Any]

    @classmethod
    def from_config(cls, d: Mapping[str, Any], data_dir: Any, levels: int) -> DataRequest:
        if d.get("path") == "???":
            raise ValueError("data.path: name the map store to train on (data.path=/path/to/maps.h5)")
        sim = d.get("simulate") or None
        npix = (sim or {}).get("npix")
        if d.get("path") in (None, "") and isinstance(npix, int) and npix % (2**levels):
            raise ValueError(f"data.simulate.npix={npix} is not divisible by 2**model.levels = {2**levels}")
        loader = {k: d[k] for k in LOADER_KEYS if k in d}
        loader["cond"] = list(loader.get("cond") or []) or None
        return cls(
            path=None if d.get("path") in (None, "") else str(d["path"]),
            simulate=sim,
            simulate_if_missing=check_bool("data.simulate_if_missing", d["simulate_if_missing"]),
            data_dir=Path(str(data_dir)).expanduser().resolve(),
            loader=loader,
        )


@dataclass(frozen=True)
class TrainRequest:
    """A training run: names, seeds, the typed settings, the Lightning trainer arguments, where to write."""

    name: str
    seed: int
    run_dir: Path
    data: DataRequest
    model: ModelSettings
    optim: OptimSettings
    check: CheckSettings
    trainer: Mapping[str, Any]
    logger: LoggerSettings
    callbacks: CallbackSettings
    ckpt_path: Path | None
    prepare_only: bool
    config: Mapping[str, Any]  # the resolved config (plain), paths.run_dir filled in: provenance

    @classmethod
    def from_config(cls, cfg: Any) -> TrainRequest:
        """The request of a composed ``train`` config (``conf/train.yaml``); the caller's config is not changed."""
        c = to_plain(copy.deepcopy(cfg))
        run_dir = _run_dir(c)
        c["paths"]["run_dir"] = str(run_dir)
        model = ModelSettings.from_config(c["model"])
        ckpt = c.get("ckpt_path")
        return cls(
            name=str(c["name"]),
            seed=check_int("seed", c["seed"], 0),
            run_dir=run_dir,
            data=DataRequest.from_config(c["data"], c["paths"]["data_dir"], model.levels),
            model=model,
            optim=OptimSettings.from_config(c["optim"]),
            check=CheckSettings.from_config(c["check"]),
            trainer=_trainer_kwargs(c["trainer"]),
            logger=LoggerSettings.from_config(c["logger"]),
            callbacks=CallbackSettings.from_config(c["callbacks"]),
            ckpt_path=Path(str(ckpt)).expanduser() if ckpt else None,
            prepare_only=check_bool("prepare_only", c["prepare_only"]),
            config=c,
        )


def _run_dir(c: Mapping[str, Any]) -> Path:
    """``paths.run_dir``, else Hydra's output folder, else ``<output_dir>/train/<name>/<date_time>``."""
    if c["paths"].get("run_dir"):
        return Path(str(c["paths"]["run_dir"])).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (Path(str(c["paths"]["output_dir"])) / "train" / str(c["name"]) / stamp).expanduser().resolve()


def _trainer_kwargs(t: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning ``Trainer`` arguments; a strategy node with ``_target_`` is instantiated."""
    import torch

    out = dict(t)
    check_trainer_keys(out)
    if isinstance(out.get("strategy"), Mapping):
        import hydra

        out["strategy"] = hydra.utils.instantiate(out["strategy"])
    prec = str(out.get("precision", "32-true"))
    if prec in ("16", "16-mixed", "16-true"):
        raise ValueError(
            f"trainer.precision={prec}: fp16 is not supported (its loss scaling clashes with the "
            "non-finite step guard); use bf16-mixed on GPUs or 32-true"
        )
    acc = str(out.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={acc} but no CUDA GPU is visible; use trainer=cpu or ddp_cpu")
    return out


def check_trainer_keys(t: Mapping[str, Any]) -> None:
    """Refuse (one line, naming the nearest valid one) a ``trainer.KEY`` that ``lightning.Trainer`` does not take:
    ``+trainer.max_step=5`` would otherwise end in a ``TypeError`` deep in Lightning."""
    import difflib
    import inspect

    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters
    valid = [k for k in params if k != "self"]
    for key, value in t.items():
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f" (did you mean trainer.{near[0]}?)" if near else ""
            raise ValueError(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
        # plain-typed arguments (int, bool, float, their Optional) checked here, not after the data is simulated
        ann = params[key].annotation
        kinds = tuple(a for a in typing.get_args(ann) if a is not type(None)) if typing.get_origin(ann) else (ann,)
        if value is None and type(None) in typing.get_args(ann):
            continue
        if kinds and all(k in (int, float, bool) for k in kinds):
            ok = (
                isinstance(value, bool)
                if kinds == (bool,)
                else isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)
            )
            if not ok:
                names = " or ".join(k.__name__ for k in kinds)
                raise ValueError(f"trainer.{key} must be {names}, got {value!r}")


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


def resolve_store(data: DataRequest) -> Path:
    """The map store to train on: ``data.path`` if set, else the cached simulation of ``data.simulate``."""
    if data.path is not None:
        p = Path(data.path).expanduser()
        if not p.exists():
            raise MapStoreError(f"{p}: map store not found (data.path; null simulates the default store)")
        return p.resolve()
    if not data.simulate_if_missing:
        raise ValueError(
            "data.path is null and data.simulate_if_missing=false: name a map store with "
            "data.path=... or allow the simulation"
        )
    if not data.simulate:
        raise ValueError("data.path is null and there is no data.simulate spec to simulate a store from")
    from lensflow.simulation import ensure_simulated

    with _file_lock(data.data_dir / ".simulate.lock"):
        return Path(ensure_simulated(dict(data.simulate), data.data_dir)).resolve()
