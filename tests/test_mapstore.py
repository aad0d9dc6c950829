"""Map store: schema, round trips, atomic writes, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from lensflow.mapstore import (
    SCHEMA_VERSION,
    MapStoreError,
    MapStoreWriter,
    StoreMeta,
    assign_splits,
    concat_stores,
    open_store,
    read_maps,
    write_store,
)


@pytest.fixture
def meta() -> StoreMeta:
    return StoreMeta(
        pixel_arcmin=1.64,
        source_redshifts=(0.5, 1.0),
        param_names=("Omega_m", "sigma_8"),
        created_by={"command": "pytest"},
        extra={"cosmology": {"h": 0.67}},
    )


@pytest.fixture
def maps() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 0.02, size=(37, 2, 16, 16)).astype(np.float32)


def _params(n: int) -> np.ndarray:
    return np.stack([np.linspace(0.2, 0.4, n), np.linspace(0.7, 0.9, n)], axis=1).astype(np.float32)


def test_round_trip_schema_and_attrs(tmp_path, meta, maps):
    path = write_store(tmp_path / "s.h5", maps, meta, params=_params(len(maps)), batch=10)
    with h5py.File(path, "r") as f:  # the documented schema, read with plain h5py
        assert f["kappa"].dtype == np.float32 and f["kappa"].shape == (37, 2, 16, 16)
        assert f["kappa"].chunks == (1, 2, 16, 16)
        assert json.loads(f["params"].attrs["param_names"]) == ["Omega_m", "sigma_8"]
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f.attrs["kind"] == "simulation" and not f.attrs["periodic"]
        np.testing.assert_allclose(f.attrs["source_redshifts"], [0.5, 1.0])
        assert json.loads(f.attrs["created_by"])["command"] == "pytest"
        assert "lensflow_version" in f.attrs
    st = open_store(path)
    assert st.shape == (37, 2, 16, 16)
    assert st.meta == meta
    np.testing.assert_array_equal(st.read(), maps)
    np.testing.assert_array_equal(st.read([30, 3, 3, 0]), maps[[30, 3, 3, 0]])
    np.testing.assert_array_equal(st.read(slice(5, 9)), maps[5:9])
    np.testing.assert_allclose(st.read_params([4]), _params(37)[[4]])
    parts = [st.indices(s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 37 and len(np.unique(np.concatenate(parts))) == 37
    k, p = read_maps(path, split="train", with_params=True)
    np.testing.assert_array_equal(k, maps[parts[0]])
    # picklable for DataLoader workers: the copy reopens its own handle
    clone = pickle.loads(pickle.dumps(st))
    np.testing.assert_array_equal(clone.read([1]), maps[[1]])


def test_split_is_per_realization_and_stable():
    rid = np.repeat(np.arange(200), 12)  # 12 patches per full-sky realization
    s = assign_splits(rid, (0.6, 0.2, 0.2), seed=3)
    for r in range(200):
        assert len(np.unique(s[rid == r])) == 1  # patches of one realization never straddle splits
    frac = np.bincount(s[::12], minlength=3) / 200
    assert np.all(np.abs(frac - [0.6, 0.2, 0.2]) < 0.1)
    # a map's split does not depend on how many other maps there are, and the seed matters
    np.testing.assert_array_equal(assign_splits(np.arange(50), seed=3), assign_splits(np.arange(500), seed=3)[:50])
    assert not np.array_equal(assign_splits(np.arange(500), seed=3), assign_splits(np.arange(500), seed=4))
    with pytest.raises(ValueError, match="fractions"):
        assign_splits([1, 2], (0.5, 0.5, 0.5))


def test_exception_mid_write_leaves_nothing(tmp_path, meta, maps):
    target = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with MapStoreWriter(target, meta, npix=16) as w:
            w.append(maps[:10], _params(10))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # an existing store survives a failed overwrite untouched
    write_store(target, maps, meta, params=_params(37))
    before = target.read_bytes()
    with pytest.raises(ValueError, match="NaN"):
        bad = maps.copy()
        bad[20, 1, 3, 3] = np.nan
        write_store(target, bad, meta, params=_params(37), overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_kill_mid_write_leaves_no_file_at_target(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from lensflow.mapstore import MapStoreWriter, StoreMeta
        meta = StoreMeta(pixel_arcmin=1.0, source_redshifts=(1.0,))
        with MapStoreWriter({str(tmp_path / "k.h5")!r}, meta, npix=8) as w:
            w.append(np.zeros((4, 1, 8, 8), np.float32))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "k.h5").exists()


def test_existing_output_needs_overwrite(tmp_path, meta, maps):
    write_store(tmp_path / "s.h5", maps, meta, params=_params(37))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_store(tmp_path / "s.h5", maps, meta, params=_params(37))
    write_store(tmp_path / "s.h5", maps[:5], meta, params=_params(5), overwrite=True)
    assert open_store(tmp_path / "s.h5").n == 5


def test_concat_keeps_realizations_and_splits(tmp_path, meta, maps):
    a = write_store(tmp_path / "a.h5", maps[:20], meta, params=_params(20), realization=np.arange(20))
    b = write_store(tmp_path / "b.h5", maps[20:], meta, params=_params(37)[20:], realization=np.arange(20, 37))
    out = concat_stores([a, b], tmp_path / "ab.h5")
    st = open_store(out)
    np.testing.assert_array_equal(st.read(), maps)
    np.testing.assert_array_equal(st.read_realization(), np.arange(37))
    np.testing.assert_array_equal(st.split, np.concatenate([open_store(a).split, open_store(b).split]))


def _store_with(tmp_path, mutate) -> str:
    path = tmp_path / "bad.h5"
    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=(1.0,))
    write_store(path, np.zeros((3, 1, 8, 8), np.float32), meta)
    with h5py.File(path, "a") as f:
        mutate(f)
    return str(path)


def _replace(name, data):
    def mutate(f):
        del f[name]
        f[name] = data

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.__delitem__("kappa"), "missing dataset 'kappa'"),
        (_replace("kappa", np.zeros((3, 8, 8), np.float32)), "rank 3"),
        (_replace("kappa", np.zeros((3, 1, 8, 6), np.float32)), "non-square"),
        (lambda f: f.attrs.__delitem__("pixel_arcmin"), "missing root attribute 'pixel_arcmin'"),
        (lambda f: f.attrs.__setitem__("pixel_arcmin", -1.0), "pixel_arcmin' must be positive"),
        (lambda f: f.attrs.__setitem__("schema_version", 99), "unknown schema_version 99"),
        (lambda f: f.attrs.__delitem__("schema_version"), "not a lensflow map store"),
        (lambda f: f.attrs.__setitem__("kind", "banana"), "'kind'"),
        (_replace("params", np.zeros((2, 0), np.float32)), "'params' has shape"),
    ],
)
def test_bad_store_gives_one_line_naming_file(tmp_path, mutate, message):
    path = _store_with(tmp_path, mutate)
    with pytest.raises(MapStoreError) as e:
        open_store(path)
    msg = str(e.value)
    assert message in msg and path in msg and "\n" not in msg


def test_nan_in_store_is_named_on_read(tmp_path):
    def poison(f):
        f["kappa"][2, 0, 1, 1] = np.inf

    path = _store_with(tmp_path, poison)
    st = open_store(path)
    np.testing.assert_array_equal(st.read([0, 1]), 0)
    with pytest.raises(MapStoreError, match=r"bad\.h5: map 2 of 'kappa' has NaN or Inf"):
        st.check_values()


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(MapStoreError, match="not found"):
        open_store(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(MapStoreError, match="junk.h5: not a readable HDF5 file"):
        open_store(junk)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pixel_arcmin": 0.0}, "pixel_arcmin"),
        ({"pixel_arcmin": float("nan")}, "pixel_arcmin"),
        ({"kind": "fake"}, "kind"),
        ({"param_names": ("a", "a")}, "param_names"),
    ],
)
def test_bad_meta(kwargs, message):
    base = {"pixel_arcmin": 1.0, "source_redshifts": (1.0,)}
    with pytest.raises(ValueError, match=message):
        StoreMeta(**{**base, **kwargs})


def test_writer_rejects_wrong_shapes(tmp_path, meta, maps):
    with MapStoreWriter(tmp_path / "w.h5", meta, npix=16) as w:
        with pytest.raises(ValueError, match=r"expected \[B, 2, 16, 16\]"):
            w.append(maps[:, :1], _params(37))
        with pytest.raises(ValueError, match="params missing"):
            w.append(maps)
        with pytest.raises(ValueError, match="unknown split name"):
            w.append(maps[:2], _params(2), split=["train", "bogus"])
        w.append(maps[:2], _params(2), split=["train", "test"])
    assert open_store(tmp_path / "w.h5").split.tolist() == [0, 2]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == ["w.h5"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_stores_respect_the_umask(tmp_path, umask_022):
    """Collaborators can read what lensflow writes: mode 0644 under umask 022 (not mkstemp's 0600)."""
    meta = StoreMeta(pixel_arcmin=1.0, source_redshifts=(1.0,))
    p = write_store(tmp_path / "s.h5", np.zeros((2, 1, 4, 4), np.float32), meta)
    assert (p.stat().st_mode & 0o777) == 0o644
    q = concat_stores([p, p], tmp_path / "c.h5")
    assert (q.stat().st_mode & 0o777) == 0o644
    os.umask(0o077)
    r = write_store(tmp_path / "private.h5", np.zeros((2, 1, 4, 4), np.float32), meta)
    assert (r.stat().st_mode & 0o777) == 0o600
