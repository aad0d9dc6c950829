"""KappaDataModule: splits, in-RAM vs lazy HDF5 reads, workers, conditioning, augmentation, sampler."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lensflow.mapstore import MapStoreError, StoreMeta, open_store, write_store
from lensflow.training.augment import dihedral_transform, random_augment, roll_each
from lensflow.training.data import KappaDataModule
from lensflow.training.order import EpochSampler


def _store(path, n=60, npix=16, channels=1, periodic=False, params=True, seed=0):
    rng = np.random.default_rng(seed)
    kappa = rng.normal(0.01, 0.02, size=(n, channels, npix, npix)).astype(np.float32)
    names = ("Omega_m", "sigma_8") if params else ()
    p = np.stack([rng.uniform(0.2, 0.4, n), rng.uniform(0.7, 0.9, n)], axis=1) if params else None
    zs = (1.0,) * channels
    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=zs, periodic=periodic, param_names=names)
    write_store(path, kappa, meta, params=p)
    return path, kappa, p


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def test_dihedral_codes_are_the_eight_symmetries_of_the_square():
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    # Independent reference: the 4 rotations of x and of its mirror image.
    ref = {np.rot90(m, k).tobytes() for m in (x[0, 0], x[0, 0][:, ::-1]) for k in range(4)}
    assert len(ref) == 8
    got = set()
    for code in range(8):
        y = dihedral_transform(torch.from_numpy(x), torch.tensor([code]))
        got.add(np.ascontiguousarray(y[0, 0].numpy()).tobytes())
    assert got == ref


def test_dihedral_per_map_codes_and_channels_move_together():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(8, 2, 6, 6)).astype(np.float32))
    codes = torch.arange(8)
    y = dihedral_transform(x, codes)
    for b in range(8):
        single = dihedral_transform(x[b : b + 1], codes[b : b + 1])
        assert torch.equal(y[b], single[0])
        # the same symmetry on both channels: the channel difference transforms like a map
        assert torch.equal(
            y[b, 0] - y[b, 1], dihedral_transform((x[b, 0] - x[b, 1])[None, None], codes[b : b + 1])[0, 0]
        )


def test_roll_each_matches_numpy_roll():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 7, 7)).astype(np.float32)
    dy, dx = np.array([0, 3, 6]), np.array([5, 0, 2])
    y = roll_each(torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(dx)).numpy()
    for b in range(3):
        np.testing.assert_array_equal(y[b], np.roll(x[b], (dy[b], dx[b]), axis=(1, 2)))


def test_random_augment_is_seeded_and_keeps_pixel_values():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(16, 1, 8, 8)).astype(np.float32))
    a = random_augment(x, torch.Generator().manual_seed(5), translate=True)
    b = random_augment(x, torch.Generator().manual_seed(5), translate=True)
    c = random_augment(x, torch.Generator().manual_seed(6), translate=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # symmetries and cyclic shifts permute pixels within each map
    assert torch.equal(a.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def test_epoch_sampler_partitions_like_distributed_sampler_and_resumes():
    n, world = 23, 3
    ranks = [EpochSampler(n, num_replicas=world, rank=r, seed=4) for r in range(world)]
    orders = [list(iter(s)) for s in ranks]
    assert all(len(o) == 8 for o in orders)  # ceil(23 / 3), padded by wrapping
    union = sorted(sum(orders, []))
    assert set(union) == set(range(n)) and len(union) == 24
    # the rank-r list is every world-th entry of one seeded permutation
    perm = np.random.default_rng([4, 0]).permutation(n)
    perm = np.concatenate([perm, perm[:1]])
    for r in range(world):
        assert orders[r] == perm[r::world].tolist()
    # each pass is the next epoch; a resumed sampler skips the maps already served
    s = EpochSampler(n, seed=4)
    e0, e1 = list(iter(s)), list(iter(s))
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(n))
    resumed = EpochSampler(n, seed=4, start_epoch=1, skip=10)
    assert list(iter(resumed)) == e1[10:]
    assert list(iter(resumed)) == EpochSampler(n, seed=4, start_epoch=2).order(2).tolist()


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


def test_splits_caps_and_in_memory_equal_lazy(tmp_path):
    path, kappa, params = _store(tmp_path / "s.h5")
    st = open_store(path)
    lazy = KappaDataModule(path, batch_size=4, in_memory=False, cond=["sigma_8", "Omega_m"], max_val_maps=3)
    ram = KappaDataModule(path, batch_size=4, in_memory=True, cond=["sigma_8", "Omega_m"], max_val_maps=3)
    for split in ("train", "test"):
        np.testing.assert_array_equal(lazy.split_indices(split), st.indices(split))
    np.testing.assert_array_equal(lazy.split_indices("val"), st.indices("val")[:3])
    for dm in (lazy, ram):
        dm.setup("fit")
        ds = dm._dataset("train")
        batch = ds.__getitems__([2, 0, 5])[0]
        idx = st.indices("train")[[2, 0, 5]]
        np.testing.assert_array_equal(batch["kappa"].numpy(), kappa[idx])
        # cond columns in the requested order, not the store's
        np.testing.assert_allclose(batch["cond"].numpy(), params[idx][:, ::-1].astype(np.float32))
    mean, std = ram.cond_stats()
    train_p = params[st.indices("train")][:, ::-1]
    np.testing.assert_allclose(mean, train_p.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, train_p.astype(np.float32).std(0), rtol=1e-5)
    assert ram.npix == 16 and ram.channels == 1 and ram.cond_dim == 2


def test_normalization_maps_come_from_the_training_split_only(tmp_path):
    path, kappa, _ = _store(tmp_path / "s.h5", n=80)
    st = open_store(path)
    dm = KappaDataModule(path, batch_size=4, norm_maps=10)
    maps = dm.normalization_maps()
    assert maps.shape == (10, 1, 16, 16)
    train = {kappa[i].tobytes() for i in st.indices("train")}
    assert all(m.tobytes() in train for m in maps)


def test_loader_with_workers_opens_hdf5_lazily(tmp_path):
    path, kappa, _ = _store(tmp_path / "s.h5", params=False)
    dm = KappaDataModule(path, batch_size=5, in_memory=False, num_workers=1)
    dm.setup("fit")
    pickle.dumps(dm._dataset("train"))  # what a worker receives: no h5py handle inside
    seen = []
    for batch in dm.val_dataloader():
        assert batch["cond"].shape == (batch["kappa"].shape[0], 0)
        seen.append(batch["kappa"].numpy())
    np.testing.assert_array_equal(np.concatenate(seen), kappa[open_store(path).indices("val")])


def test_train_loader_drops_last_and_resumes_inside_an_epoch(tmp_path):
    path, _, _ = _store(tmp_path / "s.h5", n=60, params=False)
    dm = KappaDataModule(path, batch_size=8, seed=3)
    dm.setup("fit")
    n_train = len(dm.split_indices("train"))
    full = [b["kappa"] for b in dm.train_dataloader()]
    assert len(full) == n_train // 8 and all(b.shape[0] == 8 for b in full)
    resumed = KappaDataModule(path, batch_size=8, seed=3)
    resumed.load_state_dict({"epoch": 0, "batches_in_epoch": 2, "aug_batches": 2})
    rest = [b["kappa"] for b in resumed.train_dataloader()]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cond": ["w0"]}, "w0"),
        ({"translations": True}, "periodic"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 10_000}, "fewer than one batch"),
        ({"max_val_maps": -1}, "max_val_maps"),
    ],
)
def test_bad_settings_give_one_line_errors(tmp_path, kwargs, match):
    path, _, _ = _store(tmp_path / "s.h5")
    with pytest.raises(ValueError, match=match) as e:
        KappaDataModule(path, **{"batch_size": 4, **kwargs})
    assert "\n" not in str(e.value)


def test_periodic_store_turns_translations_on(tmp_path):
    path, _, _ = _store(tmp_path / "p.h5", periodic=True, params=False)
    assert KappaDataModule(path, batch_size=4).translate
    assert not KappaDataModule(path, batch_size=4, translations=False).translate
    flat, _, _ = _store(tmp_path / "f.h5", periodic=False, params=False)
    assert not KappaDataModule(flat, batch_size=4).translate


def test_missing_or_malformed_store(tmp_path):
    with pytest.raises(MapStoreError, match="not found"):
        KappaDataModule(tmp_path / "nope.h5")
    import h5py

    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["kappa"] = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(MapStoreError, match="schema_version"):
        KappaDataModule(tmp_path / "bad.h5")


def test_eval_groups_are_the_val_maps_realization_ids(tmp_path):
    rng = np.random.default_rng(0)
    kappa = rng.normal(0.0, 0.02, size=(60, 1, 16, 16)).astype(np.float32)
    boxes = np.repeat(np.arange(12), 5)  # 5 maps per box: train/val/test never share a box
    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=(1.0,))
    path = write_store(tmp_path / "b.h5", kappa, meta, realization=boxes)
    dm = KappaDataModule(path, batch_size=4, max_val_maps=7)
    maps, _ = dm.eval_maps("val", 7)
    groups = dm.eval_groups("val", 7)
    idx = dm.split_indices("val")[:7]
    np.testing.assert_array_equal(groups, boxes[idx])
    np.testing.assert_array_equal(maps, kappa[idx])
