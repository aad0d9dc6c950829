"""The fused CPU kernels of :func:`lensflow.stats.summarize` against its torch path (the reference, itself
tested against brute-force loops and Gaussian theory in test_stats*.py)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers.fields import skewed_maps  # skewed, correlated κ-like maps [..., H, W]
from helpers.stats import kappa_config

import lensflow.stats as S
from lensflow.stats import _fused

pytestmark = pytest.mark.skipif(not _fused.AVAILABLE, reason="numba is not importable")


_cfg = functools.partial(kappa_config, pixel_arcmin=1.5, smoothing_arcmin=(0.0, 1.5, 4.0), n_edges=(9, 9, 11, 13))


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, k
        if k.split("@")[0] in ("peaks", "minima", "pdf", "v0"):
            # counts: identical (a value would have to sit within round-off of an edge to differ)
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            scale = max(1e-300, float(np.abs(y).max()))
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12 * scale, err_msg=k)


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((6, 48, 48), {}),
        ((6, 48, 48), {"periodic": True}),
        ((6, 48, 48), {"border_arcmin": 3.0}),
        ((6, 48, 48), {"periodic": True, "border_arcmin": 1.5}),
        ((5, 33, 33), {}),  # odd size
        ((4, 2, 32, 32), {}),  # two channels with cross spectra
        ((4, 3, 32, 32), {"cross": False}),
        ((40, 40), {}),  # one map
        # non-uniform edges take the exact (binary search) path
        ((6, 48, 48), {"peak_edges": (-0.01, 0.0, 0.003, 0.01, 0.03, 0.05), "pdf_edges": (-0.03, -0.01, 0.0, 0.02)}),
        ((6, 48, 48), {"statistics": ("peaks", "minkowski")}),
        ((6, 48, 48), {"statistics": ("pdf", "moments")}),
    ],
)
def test_fused_equals_torch(shape, kw):
    maps = skewed_maps(shape, 1.0, len(shape) * 7 + shape[-1], periodic=True)
    cfg = _cfg(**kw)
    _assert_same(S.summarize(maps, cfg, backend="fused"), S.summarize(maps, cfg, backend="torch"))


def test_fused_equals_torch_with_noise_and_nu_bins():
    maps = skewed_maps((7, 40, 40), 1.0, 3, periodic=True)
    cfg = _cfg(sigma_e=0.26, n_gal=30.0, noise_seed=9, bin_units="nu",
               peak_edges=tuple(np.linspace(-2, 5, 8)), minima_edges=tuple(np.linspace(-5, 2, 8)),
               pdf_edges=tuple(np.linspace(-4, 5, 10)), minkowski_thresholds=tuple(np.linspace(-2, 3, 11)))  # fmt: skip
    _assert_same(S.summarize(maps, cfg, backend="fused"), S.summarize(maps, cfg, backend="torch"))
    # a numpy generator (one stream in map order) and a CPU torch generator work on both paths too
    for make in (lambda: np.random.default_rng(4), lambda: torch.Generator().manual_seed(4)):
        _assert_same(
            S.summarize(maps, cfg, generator=make(), backend="fused"),
            S.summarize(maps, cfg, generator=make(), backend="torch"),
        )


def test_fused_results_do_not_depend_on_threads_or_blocks(monkeypatch):
    maps = torch.from_numpy(skewed_maps((23, 32, 32), 1.0, 5, periodic=True))
    cfg = _cfg(sigma_e=0.3, noise_seed=2, bin_units="kappa")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = S.summarize(maps, cfg, backend="fused")
        torch.set_num_threads(2)
        monkeypatch.setattr(S._summary_fused, "FUSED_BLOCK_PIXELS", 3 * 32 * 32)  # blocks of 3 maps
        two = S.summarize(maps, cfg, backend="fused")
    finally:
        torch.set_num_threads(old)
    for k in one:
        assert isinstance(one[k], torch.Tensor) and one[k].dtype == torch.float64
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=0, msg=k)


def test_float32_tensor_in_float32_out():
    maps = torch.from_numpy(skewed_maps((4, 32, 32), 1.0, 6, periodic=True)).float()
    cfg = _cfg()
    out = S.summarize(maps, cfg)
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = S.summarize(maps, cfg, backend="torch")
    for k in out:
        torch.testing.assert_close(out[k], ref[k], msg=k)


def test_backend_argument():
    maps = skewed_maps((2, 16, 16), 1.0, 1, periodic=True)
    with pytest.raises(ValueError, match="backend"):
        S.summarize(maps, _cfg(), backend="numba!")
    # a kernel as wide as the map: 'fused' refuses, 'auto' falls back to torch
    wide = _cfg(smoothing_arcmin=(6.0,), pixel_arcmin=1.5)
    with pytest.raises(ValueError, match="backend: 'fused'"):
        S.summarize(maps, wide, backend="fused")
    _assert_same(S.summarize(maps, wide), S.summarize(maps, wide, backend="torch"))


# -- shape-noise streams: numpy's SFC64 bits, ziggurat normals ----------------------------------------------------
def test_sfc64_matches_numpy_bit_generator():
    """Seeding and raw outputs equal numpy's own SFC64 for the same SeedSequence (an independent reference)."""
    for key in (0, 7, 123456):
        seq = np.random.SeedSequence(42, spawn_key=(key,))
        state = _fused.sfc64_seeded(seq.generate_state(3, np.uint64))
        ref = np.random.SFC64(np.random.SeedSequence(42, spawn_key=(key,)))
        assert np.array_equal(state, np.asarray(ref.state["state"]["state"], dtype=np.uint64))
        raw = ref.random_raw(1000)
        # a normal drawn in the fast path consumes exactly one output: compare through the layer/uniform map
        ours = np.empty(1000)
        _fused.normal_fill(state.copy(), ours, _fused.ZIG_X, _fused.ZIG_RATIO)
        i = (raw & np.uint64(255)).astype(np.int64)
        u = 2.0 * ((raw >> np.uint64(11)).astype(np.float64) / 2.0**53) - 1.0
        fast = np.abs(u) < _fused.ZIG_RATIO[i]
        k = int(np.argmin(fast)) if not fast.all() else fast.size  # up to the first slow-path draw
        assert k > 10
        np.testing.assert_array_equal(ours[:k], u[:k] * _fused.ZIG_X[i[:k]])


def test_ziggurat_normals_are_standard_normal():
    """4M draws: Kolmogorov-Smirnov against N(0, 1), first four moments and both tails (beyond the ziggurat's
    R = 3.654 and beyond 4.5) within 5 sigma of their sampling errors."""
    from scipy import stats

    n = 4_000_000
    z = np.empty(n)
    _fused.normal_fill(_fused.sfc64_seeded(np.array([1, 2, 3], np.uint64)), z, _fused.ZIG_X, _fused.ZIG_RATIO)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    for cut in (_fused._ZIG_R, 4.5):
        p = 2 * stats.norm.sf(cut)
        assert abs((np.abs(z) > cut).sum() - n * p) < 5 * np.sqrt(n * p), cut
    assert np.isfinite(z).all()


def test_ziggurat_plain_python_gives_the_same_numbers(monkeypatch):
    """The fallback without numba (the same function as plain Python) draws the identical stream,
    wedge and tail rejections included."""
    words = np.random.SeedSequence(3, spawn_key=(1,)).generate_state(3, np.uint64)
    jit, py = np.empty(30_000), np.empty(30_000)
    _fused.normal_fill(_fused.sfc64_seeded(words), jit, _fused.ZIG_X, _fused.ZIG_RATIO)
    monkeypatch.setattr(_fused, "_sfc64", _fused._sfc64.py_func)  # as without numba: all plain Python
    with np.errstate(over="ignore"):
        state = _fused.sfc64_seeded.py_func(words)
        _fused.normal_fill.py_func(state, py, _fused.ZIG_X, _fused.ZIG_RATIO)
    np.testing.assert_array_equal(jit, py)
    assert (np.abs(jit) > _fused._ZIG_R).sum() >= 3  # the tail branch ran
