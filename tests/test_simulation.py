"""``lensflow.simulation`` and ``python -m lensflow.simulate``: specs, stores, grid mode, the cache, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.config import compose, plain

import lensflow.simulation.cache as cachemod
import lensflow.simulation.spec as specmod
from lensflow.mapstore import open_store
from lensflow.sims.flat import simulate_maps
from lensflow.sims.fullsky import patch_centers
from lensflow.simulation import ensure_simulated, resolve_spec, simulate, spec_hash
from lensflow.simulation.defaults import RUN_DEFAULTS, SIM_PRESETS, spec_defaults

ROOT = Path(__file__).resolve().parent.parent
FAST = ["sim.cosmology.m_nu=0", "progress=false"]  # no massive-neutrino CAMB run: 5x faster set-up


def _compose(overrides):
    return compose("simulate", *overrides)


def test_compose_and_simulate_lognormal(tmp_path):
    out = tmp_path / "k.h5"
    cfg = _compose(["n_maps=12", "npix=32", "pixel_arcmin=2.0", "seed=3", f"out={out}", "batch_size=5", *FAST])
    assert cfg.sim.backend == "flat" and cfg.sim.kind == "lognormal" and cfg.sim.z_source == [1.0]
    assert simulate(cfg) == out
    st = open_store(out)
    assert (st.n, st.channels, st.npix) == (12, 1, 32)
    assert st.meta.pixel_arcmin == 2.0 and st.meta.source_redshifts == (1.0,) and not st.meta.periodic
    assert st.meta.param_names == ()
    extra = st.meta.extra
    assert extra["backend"] == "flat" and extra["kind"] == "lognormal"
    assert extra["cosmology"]["Omega_m"] == pytest.approx(0.3111) and extra["shift"] == pytest.approx([0.02975])
    assert st.meta.created_by["config"]["n_maps"] == 12 and "versions" in st.meta.created_by
    st.check_values()
    # batch_size does not change a map: the same spec gives the same maps as one direct call
    cosmo = dict(cfg.sim.cosmology)
    np.testing.assert_array_equal(st.read(), simulate_maps(12, 32, 2.0, cosmo, [1.0], seed=3))
    assert st.read().min() >= -0.02975


def test_gaussian_config_and_tomography(tmp_path):
    out = tmp_path / "g.h5"
    cfg = _compose(
        ["sim=gaussian_flat", "n_maps=4", "npix=16", "sim.z_source=[0.5,1.0]", "sim.periodic=true", f"out={out}", *FAST]
    )
    simulate(cfg)
    st = open_store(out)
    assert st.channels == 2 and st.meta.periodic and st.meta.extra["kind"] == "gaussian"
    assert st.meta.source_redshifts == (0.5, 1.0) and "shift" not in st.meta.extra


def test_grid_mode_stores_params(tmp_path):
    out = tmp_path / "grid.h5"
    cfg = _compose(
        [
            "n_maps=3",
            "npix=16",
            "grid={Omega_m:[0.28,0.32],sigma_8:[0.7,0.9]}",
            f"out={out}",
            "+sim.cosmology.transfer_function=eisenstein_hu",
            *FAST,
        ]
    )
    simulate(cfg)
    st = open_store(out)
    assert st.meta.param_names == ("Omega_m", "sigma_8") and st.n == 12
    expect = np.repeat([[0.28, 0.7], [0.28, 0.9], [0.32, 0.7], [0.32, 0.9]], 3, axis=0)
    np.testing.assert_allclose(st.read_params(), expect, rtol=1e-6)
    assert len(set(st.read_realization().tolist())) == 12
    # grid point k is the stream [seed, k] of that cosmology
    cosmo = {**dict(cfg.sim.cosmology), "Omega_m": 0.32, "sigma_8": 0.9}
    np.testing.assert_array_equal(
        st.read(np.arange(9, 12)), simulate_maps(3, 16, cfg.pixel_arcmin, cosmo, [1.0], seed=[0, 3])
    )
    zipped = tmp_path / "zip.h5"
    simulate(
        _compose(
            [
                "n_maps=2",
                "npix=16",
                "grid={sigma_8:[0.7,0.9]}",
                "grid_mode=zip",
                f"out={zipped}",
                "+sim.cosmology.transfer_function=eisenstein_hu",
                *FAST,
            ]
        )
    )
    np.testing.assert_allclose(open_store(zipped).read_params()[:, 0], [0.7, 0.7, 0.9, 0.9], rtol=1e-6)


def test_bad_config_raises_before_writing(tmp_path):
    out = tmp_path / "x.h5"
    for bad, match in [
        (["grid={Omega_x:[0.3]}"], "grid.Omega_x"),
        (["sim.kind=poisson"], "sim.kind"),
        (["n_maps=0"], "n_maps"),
        (["sim.cosmology.Omega_b=0.4"], "Omega_b"),
        (["sim.pad=1"], "pad"),
        (["split.fractions=[0.5,0.5,0.5]"], "fractions"),
    ]:
        with pytest.raises(ValueError, match=match):
            simulate(_compose(["n_maps=2", "npix=16", f"out={out}", *FAST, *bad]))
        assert not out.exists() and not list(tmp_path.iterdir())


def test_ensure_simulated_caches_by_spec(tmp_path, monkeypatch):
    spec = {
        "sim": "lognormal_flat",
        "n_maps": 4,
        "npix": 16,
        "pixel_arcmin": 2.0,
        "seed": 0,
        "grid": None,
        "split": {"fractions": [0.8, 0.1, 0.1], "seed": 0},
    }
    spec["sim"] = {**resolve_spec(spec)["sim"], "cosmology": {**resolve_spec(spec)["sim"]["cosmology"], "m_nu": 0.0}}
    calls = []
    real = cachemod.simulate
    monkeypatch.setattr(cachemod, "simulate", lambda cfg: calls.append(1) or real(cfg))
    path = ensure_simulated(spec, tmp_path)
    assert path.name == f"sim-{spec_hash(spec)}.h5" and len(path.stem) == len("sim-") + 12
    assert open_store(path).n == 4 and len(calls) == 1
    mtime = path.stat().st_mtime_ns
    assert ensure_simulated({**spec, "batch_size": 2}, tmp_path) == path  # run-time keys do not matter
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    other = ensure_simulated({**spec, "seed": 1}, tmp_path)
    assert other != path and len(calls) == 2
    assert not np.array_equal(open_store(other).read(), open_store(path).read())
    # the same spec written differently (defaults left out, ints for floats, a bare redshift) hashes the same
    same = {k: v for k, v in spec.items() if k not in ("grid", "split")}
    same["sim"] = {**spec["sim"], "z_source": 1, "cosmology": {**spec["sim"]["cosmology"], "m_nu": 0}}
    assert spec_hash(same) == spec_hash(spec)
    with pytest.raises(ValueError, match="unknown keys"):
        ensure_simulated({**spec, "nmaps": 3}, tmp_path)


def test_fullsky_backend_patches_share_realizations(tmp_path):
    per_sky = patch_centers(8, 240.0)[0].size
    out = tmp_path / "fs.h5"
    simulate(
        _compose(
            [
                "sim=lognormal_fullsky",
                "sim.nside=32",
                "sim.shell_dx=400",
                "npix=8",
                "pixel_arcmin=240",
                f"n_maps={per_sky + 3}",
                f"out={out}",
                "+sim.cosmology.transfer_function=eisenstein_hu",
                *FAST,
            ]
        )
    )
    st = open_store(out)
    rid = st.read_realization()
    assert st.n == per_sky + 3 and rid.tolist() == [0] * per_sky + [1] * 3
    for r in (0, 1):
        assert len(set(st.split[rid == r].tolist())) == 1
    assert st.meta.extra["backend"] == "fullsky"


def test_cli(tmp_path):
    out = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "lensflow.simulate", "n_maps=3", "npix=16", f"out={out}", *FAST]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_store(out).n == 3
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # exists: refuse
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: out: {out} exists; pass overwrite=true to replace it"
    ]
    r = subprocess.run(
        [*cmd[:-3], "sim=nosuch", f"out={tmp_path / 'd.h5'}"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and not (tmp_path / "d.h5").exists()


# --------------------------------------------------------------------------------------------
# One resolution per call, composed configs used as they are, hashes that never move
# --------------------------------------------------------------------------------------------

#: sim-<hash>.h5 names of the README's configs as main computed them before the restructure: the cache
#: a user already has must still be found.
KNOWN_HASHES = {
    (): "144c54dedc37",  # python -m lensflow.train (data.simulate)
    ("+experiment=kappa",): "cb14293796c6",
    ("+experiment=kappa_cond",): "dd031d4f32e4",
    ("+experiment=kappa_quick",): "e4e3e449fdce",  # 10,000 maps since issue 12 (was f185898f62e5 with 4,000)
}


@pytest.mark.parametrize("overrides", sorted(KNOWN_HASHES))
def test_spec_hashes_of_the_experiments_are_unchanged(overrides):
    assert spec_hash(compose("train", *overrides).data.simulate) == KNOWN_HASHES[overrides]


def test_simulate_defaults_hash_and_partial_specs():
    c = plain("simulate")
    assert spec_hash({k: c[k] for k in specmod.SPEC_KEYS}) == "209b3fbc23ce"
    partial = {"n_maps": 400, "npix": 32, "pixel_arcmin": 3.28, "sim": {"cosmology": {"m_nu": 0.0}}, "progress": False}
    assert spec_hash(partial) == "24baa838e921"


def test_ensure_simulated_resolves_once_and_reads_no_yaml_for_a_composed_spec(tmp_path, monkeypatch):
    spec = plain("train", "data.simulate.n_maps=3", "data.simulate.npix=16", "data.simulate.sim.cosmology.m_nu=0")
    calls = []
    real = cachemod.resolve_spec
    monkeypatch.setattr(cachemod, "resolve_spec", lambda s: calls.append(1) or real(s))

    def no_yaml(*a):
        raise AssertionError("a composed spec is complete: no defaults may be loaded")

    monkeypatch.setattr(specmod, "spec_defaults", no_yaml)
    path = ensure_simulated({**spec["data"]["simulate"], "progress": False}, tmp_path)
    assert open_store(path).n == 3 and len(calls) == 1


def test_the_command_line_composes_the_python_tables():
    """The configs compose the library's tables (``lensflow.simulation.defaults``, taken as nodes): every preset has
    its ``conf/sim`` option, the composed keys are the spec's and each backend's, in the tables' order, so a partial
    spec from Python and its composed twin resolve to one spec and one hash."""
    c = plain("simulate")
    assert set(specmod.SPEC_KEYS) | set(specmod.RUN_KEYS) == set(c)
    assert {k: c[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS
    assert sorted(SIM_PRESETS) == sorted(p.stem for p in (ROOT / "conf" / "sim").glob("*.yaml"))
    for name in SIM_PRESETS:
        composed = plain("simulate", f"sim={name}")
        assert spec_defaults(name) == {k: composed[k] for k in specmod.SPEC_KEYS}, name
        assert list(spec_defaults(name)["sim"]) == list(composed["sim"]), name  # same order: same provenance text
        assert set(composed["sim"]) == set(specmod.SIM_KEYS[composed["sim"]["backend"]]), name
    assert set(plain("train").get("data")["simulate"]) == set(specmod.SPEC_KEYS)
    assert c["split"] == plain("ingest")["split"] == {"fractions": [0.8, 0.1, 0.1], "seed": 0}
    from lensflow.mapstore import DEFAULT_FRACTIONS

    assert tuple(c["split"]["fractions"]) == DEFAULT_FRACTIONS


def test_store_is_readable_by_the_group_under_umask_022(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = simulate(_compose(["n_maps=2", "npix=16", f"out={tmp_path / 'u.h5'}", *FAST]))
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644
