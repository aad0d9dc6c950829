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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lensflow.mapstore import MapStore, MapStoreError, open_store

__all__ = ["KappaDataModule", "EpochSampler", "dihedral_transform", "random_augment"]


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def dihedral_transform(x: Tensor, code: Tensor) -> Tensor:
    """Apply one of the 8 symmetries of the square to each map of ``x`` [B, C, H, W].

    ``code`` [B] holds integers 0..7: bit 0 = transpose (H<->W), bit 1 = flip rows, bit 2 = flip columns.
    Transpose-then-flips covers every element of the dihedral group D4 exactly once.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be square maps [B, C, H, W], got {tuple(x.shape)}")
    code = code.to(x.device).view(-1, 1, 1, 1)
    x = torch.where(code & 1 == 1, x.transpose(-1, -2), x)
    x = torch.where(code & 2 == 2, x.flip(-2), x)
    return torch.where(code & 4 == 4, x.flip(-1), x)


def _roll_each(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Cyclic shift of map b by (dy[b], dx[b]) pixels (like ``torch.roll`` per map)."""
    B, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device).view(1, H) - dy.view(B, 1)) % H
    cols = (torch.arange(W, device=x.device).view(1, W) - dx.view(B, 1)) % W
    x = x.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W))
    return x.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


def random_augment(x: Tensor, generator: torch.Generator, translate: bool) -> Tensor:
    """Random dihedral symmetry (and cyclic shift if ``translate``) per map; draws on a CPU generator."""
    B, H = x.shape[0], x.shape[-1]
    code = torch.randint(0, 8, (B,), generator=generator)
    out = dihedral_transform(x, code)
    if translate:
        shifts = torch.randint(0, H, (2, B), generator=generator).to(x.device)
        out = _roll_each(out, shifts[0], shifts[1])
    return out


# --------------------------------------------------------------------------------------------
# Dataset and sampler
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


class EpochSampler(Sampler[int]):
    """Deterministic, resumable, rank-aware sampler (what ``DistributedSampler`` does, plus a resume offset).

    Epoch ``e`` uses ``numpy.random.default_rng([seed, e]).permutation(n)`` (or ``arange`` without
    shuffle), padded by wrapping to a multiple of ``num_replicas``; rank ``r`` takes positions
    ``r, r + R, ...``. Each pass (``iter``) is the next epoch, starting at ``start_epoch``, whose first
    ``skip`` maps are dropped (resume inside an epoch). ``set_epoch`` is accepted for Lightning but not
    trusted: after a resume from a checkpoint written by an early stop, Lightning's epoch index runs one
    ahead of the data it has consumed, while this sampler counts the passes it has served.
    """

    def __init__(
        self,
        n: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        start_epoch: int = 0,
        skip: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for num_replicas={num_replicas}")
        self.n = int(n)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.next_epoch = int(start_epoch)
        self.current_epoch = int(start_epoch)
        self.skip = int(skip)
        self.lightning_epoch: int | None = None
        self.num_samples = math.ceil(self.n / self.num_replicas) if self.n else 0

    def set_epoch(self, epoch: int) -> None:
        self.lightning_epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Map positions this rank visits in ``epoch`` (without the resume offset)."""
        if self.n == 0:
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        total = self.num_samples * self.num_replicas
        if total > self.n:
            perm = np.concatenate([perm, perm[: total - self.n]])
        return perm[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        self.current_epoch = self.next_epoch
        self.next_epoch += 1
        idx = self.order(self.current_epoch)
        if self.skip:
            idx, self.skip = idx[self.skip :], 0
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.num_samples


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
        for name, v, lo in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("norm_maps", norm_maps, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"data.{name} must be an integer >= {lo}, got {v!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"data.eval_batch_size must be an integer >= 1 or null, got {eval_batch_size!r}")
        for name, v in (
            ("max_train_maps", max_train_maps),
            ("max_val_maps", max_val_maps),
            ("max_test_maps", max_test_maps),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"data.{name} must be a positive integer or null, got {v!r}")
        if translations == "auto":
            translate = bool(meta.periodic)
        elif isinstance(translations, bool):
            translate = translations
            if translate and not meta.periodic:
                raise ValueError(
                    f"data.translations=true needs periodic maps, but {self.path} is not periodic "
                    "(cyclic shifts would create seams); use translations=auto or false"
                )
        else:
            raise ValueError(f"data.translations must be auto, true or false, got {translations!r}")
        names = tuple(str(c) for c in (cond or ()))
        missing = [c for c in names if c not in meta.param_names]
        if missing:
            raise ValueError(
                f"data.cond names {missing} are not parameters of {self.path} "
                f"(it has {list(meta.param_names) or 'none'})"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"data.cond has repeated names: {list(names)}")
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
    def meta(self):
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

    def map_meta(self) -> dict[str, Any]:
        """Plain-dict description of the training maps (kept in the module and checkpoints)."""
        m = self.meta
        return {
            "pixel_arcmin": float(m.pixel_arcmin),
            "source_redshifts": [float(z) for z in m.source_redshifts],
            "periodic": bool(m.periodic),
            "npix": int(self.npix),
            "channels": int(self.channels),
            "kind": str(m.kind),
            "store": str(self.path.resolve()),
            "n_train": int(len(self._split_idx["train"])),
            "n_val": int(len(self._split_idx["val"])),
        }

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
    def normalization_maps(self) -> np.ndarray:
        """Up to ``norm_maps`` training maps [N, C, H, W], evenly spread over the training split."""
        idx = self._split_idx["train"]
        if len(idx) > self.norm_maps:
            idx = idx[np.linspace(0, len(idx) - 1, self.norm_maps).round().astype(np.int64)]
        return self.store.read(idx)

    def cond_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std [P] of the conditioning parameters over the training split (std 1 where constant)."""
        p = self._params(self._split_idx["train"]).astype(np.float64)
        if p.shape[1] == 0:
            return np.zeros(0), np.ones(0)
        mean, std = p.mean(axis=0), p.std(axis=0)
        return mean, np.where(std > 0, std, 1.0)

    def eval_maps(self, split: str = "val", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` maps of a split and their conditioning params (for sample checks)."""
        idx = self._split_idx[split]
        if n is not None:
            idx = idx[:n]
        return self.store.read(idx), self._params(idx)

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
            g = torch.Generator().manual_seed(_mix(self.seed, int(trainer.global_rank), self._aug_batches))
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


def _mix(*ints: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing, platform independent)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> np.uint64(1))
