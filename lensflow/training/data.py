"""Lightning DataModule over an HDF5 map store (:mod:`lensflow.mapstore`).

Batches are dicts ``{"kappa": float32 [B, C, H, W] (κ), "cond": float32 [B, P] (physical units, P may
be 0)}``. Train/val/test come from the store's ``/split``; ``max_*_maps`` keep the first maps of a split
in store order.

Data order and augmentation are functions of ``(seed, epoch, position)`` only, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would:

* training order: a permutation per epoch drawn from ``numpy.random.default_rng([seed, epoch])``, dealt
  round-robin to the ranks like torch's ``DistributedSampler`` (padded to a multiple of the world size,
  last partial batch dropped); after a resume the maps already consumed in the interrupted epoch are
  skipped. The DataModule's ``state_dict`` (saved in every Lightning checkpoint) holds the position.
* augmentation (training only, after the batch is on its device): each map gets one of the 8 symmetries
  of the square (optional transpose, optional flips of each axis) and, for periodic stores, a random
  cyclic shift, drawn from a generator seeded by ``(seed, rank, batch counter)``.

Normalisation statistics (κ mean/std or shifted log, conditioning mean/std) come from the training split
only; the module stores them in its buffers so they travel with the checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lensflow._util.checks import check_int, check_optional_int
from lensflow._util.seeds import mix
from lensflow.mapstore import MapStore, MapStoreError, StoreMeta, open_store
from lensflow.training.augment import dihedral_transform, random_augment, roll_each
from lensflow.training.order import EpochSampler

__all__ = ["EpochSampler", "KappaDataModule", "dihedral_transform", "random_augment", "roll_each"]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class _MapDataset(Dataset):
    """Maps (and params) of one split, from RAM or read from the store per batch.

    Batched reads go through ``__getitems__`` (one sorted HDF5 read per batch); the store's h5py handle is
    opened lazily in each worker because :class:`MapStore` drops it when pickled.
    """

    def __init__(self, store: MapStore, indices: np.ndarray, params: np.ndarray, in_memory: bool) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.params = np.asarray(params, dtype=np.float32)  # [n, P] (already selected, small)
        self.maps: np.ndarray | None = store.read(self.indices) if in_memory else None

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, pos: np.ndarray) -> np.ndarray:
        if self.maps is not None:
            return self.maps[pos]
        return self.store.read(self.indices[pos])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, pos: Sequence[int]) -> list[dict[str, Tensor]]:
        p = np.asarray(pos, dtype=np.int64)
        k = torch.from_numpy(np.ascontiguousarray(self._read(p), dtype=np.float32))
        c = torch.from_numpy(np.ascontiguousarray(self.params[p]))
        return [{"kappa": k, "cond": c}]  # one pre-stacked batch; see _first


def _first(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Collate for ``__getitems__``: the dataset already returns the stacked batch."""
    if len(batch) == 1:
        return batch[0]
    return {k: torch.cat([b[k] for b in batch]) for k in batch[0]}


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class KappaDataModule(L.LightningDataModule):
    """Train/val/test loaders over one map store.

    Args:
        path: the map store (HDF5, see :mod:`lensflow.mapstore`).
        batch_size: training maps per optimizer step and process.
        eval_batch_size: validation/test batch size (default ``batch_size``).
        num_workers: DataLoader worker processes (each opens the store lazily).
        in_memory: load the used splits into RAM in :meth:`setup` (else read per batch from HDF5).
        augment: random dihedral symmetry per training map.
        translations: random cyclic shifts per training map: ``"auto"`` (only for periodic stores),
            ``True`` (requires a periodic store) or ``False``.
        cond: parameter names to return as ``cond`` (in this order); ``None``/empty = unconditional.
        max_train_maps, max_val_maps, max_test_maps: keep only the first maps of each split.
        norm_maps: number of training maps used by :meth:`normalization_maps`.
        seed: seed of the data order and augmentation.
        pin_memory: pin host memory (``"auto"``: when the trainer runs on CUDA).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        in_memory: bool = True,
        augment: bool = True,
        translations: bool | str = "auto",
        cond: Sequence[str] | None = None,
        max_train_maps: int | None = None,
        max_val_maps: int | None = None,
        max_test_maps: int | None = None,
        norm_maps: int = 4096,
        seed: int = 0,
        pin_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.store = open_store(self.path)  # validates the schema now: bad stores fail before training
        meta = self.store.meta
        check_int("data.batch_size", batch_size, 1)
        check_int("data.num_workers", num_workers, 0)
        check_int("data.norm_maps", norm_maps, 1)
        check_optional_int("data.eval_batch_size", eval_batch_size, 1)
        for name, v in (
            ("max_train_maps", max_train_maps),
            ("max_val_maps", max_val_maps),
            ("max_test_maps", max_test_maps),
        ):
            check_optional_int(f"data.{name}", v, 1)
        translate = _translations(translations, meta.periodic, self.path)
        names = _cond_names(cond, meta, self.path)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.in_memory = bool(in_memory)
        self.augment = bool(augment)
        self.translate = translate
        self.param_names: tuple[str, ...] = names
        self._param_cols = [meta.param_names.index(c) for c in names]
        self.max_maps = {"train": max_train_maps, "val": max_val_maps, "test": max_test_maps}
        self.norm_maps = norm_maps
        self.seed = int(seed)
        self.pin_memory = pin_memory
        self._split_idx = {s: self._select(s) for s in ("train", "val", "test")}
        if len(self._split_idx["train"]) < batch_size:
            raise MapStoreError(
                f"{self.path}: the training split has {len(self._split_idx['train'])} maps, "
                f"fewer than one batch (data.batch_size={batch_size})"
            )
        if len(self._split_idx["val"]) == 0:
            raise MapStoreError(f"{self.path}: the validation split is empty")
        self._datasets: dict[str, _MapDataset] = {}
        self._train_sampler: EpochSampler | None = None
        # Position in the training stream, restored from checkpoints (see state_dict).
        self._epoch = 0
        self._batches_in_epoch = 0
        self._aug_batches = 0

    # -- description ------------------------------------------------------------------------------------
    @property
    def meta(self) -> StoreMeta:
        """The store's metadata (pixel scale, source redshifts, periodicity, ...)."""
        return self.store.meta

    @property
    def channels(self) -> int:
        return self.store.channels

    @property
    def npix(self) -> int:
        return self.store.npix

    @property
    def cond_dim(self) -> int:
        return len(self.param_names)

    @property
    def store_path(self) -> str:
        """The store's absolute path (recorded in checkpoints)."""
        return str(self.path.resolve())

    def split_indices(self, split: str) -> np.ndarray:
        """Store indices of the maps used for ``split`` (after ``max_*_maps``)."""
        return self._split_idx[split]

    def _select(self, split: str) -> np.ndarray:
        idx = self.store.indices(split)
        cap = self.max_maps[split]
        return idx[:cap] if cap is not None else idx

    def _params(self, idx: np.ndarray) -> np.ndarray:
        if not self._param_cols:
            return np.zeros((len(idx), 0), np.float32)
        return self.store.read_params(idx)[:, self._param_cols].astype(np.float32)

    # -- statistics -------------------------------------------------------------------------------------
    def _normalization_idx(self) -> np.ndarray:
        idx = self._split_idx["train"]
        if len(idx) > self.norm_maps:
            idx = idx[np.linspace(0, len(idx) - 1, self.norm_maps).round().astype(np.int64)]
        return idx

    def normalization_maps(self) -> np.ndarray:
        """Up to ``norm_maps`` training maps [N, C, H, W], evenly spread over the training split."""
        return self.store.read(self._normalization_idx())

    def normalization_params(self) -> np.ndarray:
        """The conditioning params [N, P] (physical) of :meth:`normalization_maps`."""
        return self._params(self._normalization_idx())

    def cond_stats(self, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std [P] of the conditioning parameters (of their logs with ``log``) over the training split (std 1
        where constant)."""
        p = self._params(self._split_idx["train"]).astype(np.float64)
        if p.shape[1] == 0:
            return np.zeros(0), np.ones(0)
        if log:
            if not (p > 0).all():
                names = [n for n, ok in zip(self.param_names, (p > 0).all(axis=0), strict=True) if not ok]
                raise ValueError(f"model.cond_log: conditioning parameters {names} in {self.path} are not all > 0")
            p = np.log(p)
        mean, std = p.mean(axis=0), p.std(axis=0)
        return mean, np.where(std > 0, std, 1.0)

    def cond_box(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The training box: min and max [P] of each conditioning parameter over the training split (physical
        units; ``None`` if unconditional). Sampling outside it is refused unless asked for."""
        p = self._params(self._split_idx["train"]).astype(np.float64)
        if p.shape[1] == 0:
            return None
        return p.min(axis=0), p.max(axis=0)

    def eval_maps(self, split: str = "val", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` maps of a split and their conditioning params (for sample checks)."""
        idx = self._split_idx[split][:n]
        return self.store.read(idx), self._params(idx)

    def eval_groups(self, split: str = "val", n: int | None = None) -> np.ndarray:
        """The realization ids of :meth:`eval_maps`'s maps: maps that share one (one N-body box) are correlated, and
        the sample check compares them with clustered errors, as ``validate`` does."""
        return self.store.read_realization()[self._split_idx[split][:n]]

    # -- Lightning hooks --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(
            stage or "fit", ("train", "val", "test")
        )
        for split in wanted:
            if split not in self._datasets:
                idx = self._split_idx[split]
                self._datasets[split] = _MapDataset(self.store, idx, self._params(idx), self.in_memory)
        # The loaders' workers get their own handle; do not keep the parent's open across fork.
        self.store.close()

    def _dataset(self, split: str) -> _MapDataset:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self._datasets[split]

    def _loader_kwargs(self) -> dict[str, Any]:
        pin = self.pin_memory
        if pin == "auto":
            pin = bool(self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        return {
            "num_workers": self.num_workers,
            "pin_memory": bool(pin),
            "persistent_workers": self.num_workers > 0,
            "collate_fn": _first,
        }

    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.world_size), int(self.trainer.global_rank)
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        world, rank = self._world()
        # Where the training stream stands (restored from a checkpoint's DataModule state on resume):
        # continue an unfinished epoch after the maps it already served, else start the next one.
        per_epoch = math.ceil(len(ds) / world) // self.batch_size
        limit = getattr(self.trainer, "limit_train_batches", None)  # as Lightning shortens an epoch
        if isinstance(limit, int) and not isinstance(limit, bool):
            per_epoch = min(per_epoch, limit)
        elif isinstance(limit, float) and limit < 1.0:
            per_epoch = int(per_epoch * limit)
        epoch, skip = self._epoch, 0
        if self._batches_in_epoch >= per_epoch:
            epoch, self._batches_in_epoch = epoch + 1, 0
        elif self._batches_in_epoch > 0:
            skip = self._batches_in_epoch * self.batch_size
        sampler = EpochSampler(
            len(ds), num_replicas=world, rank=rank, shuffle=True, seed=self.seed, start_epoch=epoch, skip=skip
        )
        self._train_sampler = sampler
        return _ResumableLoader(
            self, ds, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        world, rank = self._world()
        sampler = EpochSampler(len(ds), num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            ds, batch_size=self.eval_batch_size, sampler=sampler, drop_last=False, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training or trainer.sanity_checking:
            return batch
        sampler = self._train_sampler
        epoch = sampler.current_epoch if sampler is not None else 0
        if epoch != self._epoch:
            self._epoch, self._batches_in_epoch = epoch, 0
        self._batches_in_epoch += 1
        self._aug_batches += 1
        if self.augment:
            g = torch.Generator().manual_seed(mix(self.seed, int(trainer.global_rank), self._aug_batches))
            batch = dict(batch)
            batch["kappa"] = random_augment(batch["kappa"], g, self.translate)
        return batch

    def state_dict(self) -> dict[str, Any]:
        # Saved in every Lightning checkpoint: where the training stream stands, so a resume skips the
        # maps already used in the interrupted epoch and continues the augmentation stream.
        return {
            "epoch": self._epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "aug_batches": self._aug_batches,
            "seed": self.seed,
            "n_train": int(len(self._split_idx["train"])),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._batches_in_epoch = int(state.get("batches_in_epoch", 0))
        self._aug_batches = int(state.get("aug_batches", 0))


class _ResumableLoader(DataLoader):
    """Training loader that tells Lightning it is resumable: its position lives in the DataModule state."""

    def __init__(self, dm: KappaDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dm_state = dm.state_dict

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._dm_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The DataModule restores the position (before this loader is built); nothing to do here.
        return None


def _cond_names(cond: Sequence[str] | None, meta: StoreMeta, path: Path) -> tuple[str, ...]:
    """The conditioning parameter names, each a parameter of the store, none repeated."""
    names = tuple(str(c) for c in (cond or ()))
    missing = [c for c in names if c not in meta.param_names]
    if missing:
        raise ValueError(
            f"data.cond names {missing} are not parameters of {path} (it has {list(meta.param_names) or 'none'})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"data.cond has repeated names: {list(names)}")
    return names


def _translations(translations: bool | str, periodic: bool, path: Path) -> bool:
    """Whether training maps get random cyclic shifts: ``auto`` (periodic stores only), true or false."""
    if translations == "auto":
        return bool(periodic)
    if not isinstance(translations, bool):
        raise ValueError(f"data.translations must be auto, true or false, got {translations!r}")
    if translations and not periodic:
        raise ValueError(
            f"data.translations=true needs periodic maps, but {path} is not periodic "
            "(cyclic shifts would create seams); use translations=auto or false"
        )
    return translations
