"""The stats and flow benchmark suites run end to end on tiny sizes (nothing is timed here: the figures
live in the README). The GPU-only code is run on CPU, so it is not first executed on a lent GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.config import plain

try:  # the optional [bench] extra
    import normflows  # noqa: F401

    HAVE_NORMFLOWS = True
except ImportError:
    HAVE_NORMFLOWS = False


pytestmark = pytest.mark.usefixtures("one_thread")


def _suite(name: str, **kw) -> dict:
    """conf/bench/<name>.yaml as composed (the suites read complete configs), with ``kw`` on top."""
    return {**plain("bench", f"bench={name}")["bench"], **kw}


def test_bench_stats_rows_and_gpu_code_on_cpu():
    from lensflow.bench import stats as bs

    cfg = {"n_maps": 12, "npix": 32, "baseline_maps": 4, "check_maps": 3, "repeats": 1, "threads": [1, 2],
           "gpu_maps": 6, "gpu_npix": 32, "gpu_batch": 4}  # fmt: skip
    rows = bs.run(_suite("stats", **cfg))  # also checks that the numpy loop and summarize agree on noiseless maps
    assert [(r["variant"], r.get("threads")) for r in rows] == [("numpy loop", 1), ("lensflow", 1), ("lensflow", 2)]
    loop = rows[0]["value"]
    for r in rows:
        assert r["unit"] == "maps/s" and r["value"] > 0 and r["device"] == "cpu"
        assert math.isclose(r["ratio"], r["value"] / loop)
    with pytest.raises(ValueError, match="unknown keys"):
        bs.run({"n_map": 3})
    c = _suite("stats", **cfg)
    gpu = bs._gpu_rows(c, bs._config(c), np.random.default_rng(0), device="cpu")
    assert [r["variant"] for r in gpu] == ["numpy loop", "lensflow"]
    assert gpu[1]["maps"] == 6 and gpu[1]["value"] > 0
    assert math.isclose(gpu[1]["ratio"], gpu[1]["value"] / gpu[0]["value"])


def test_bench_flow_rows_with_bf16_variant():
    """Tiny models; ``bf16: true`` runs the bf16-autocast variant (CUDA-only by default) on CPU."""
    from lensflow.bench import flow as bf

    iters = {"warmup": 0, "train": 1, "sample": 1, "bpd_steps": 2, "bpd_batch": 4, "bpd_test": 8}
    cfg = {"image_size": 8, "levels": 2, "steps": 1, "hidden": 8, "batch": 4, "devices": ["cpu"], "bf16": True,
           "iters": {"cpu": iters}}  # fmt: skip
    rows = bf.run(_suite("flow", **{**cfg, "iters": {**_suite("flow")["iters"], **cfg["iters"]}}))
    got = [(r["benchmark"], r["variant"]) for r in rows]
    assert got == [
        ("flow/train", "lensflow"),
        ("flow/train", "lensflow bf16-autocast"),
        ("flow/sample", "lensflow"),
        ("flow/sample", "lensflow bf16-autocast"),
        ("flow/bits_per_dim", "lensflow"),
    ]
    for r in rows:
        assert r["device"] == "cpu" and r["value"] > 0 and math.isfinite(r["value"])
        if r["benchmark"] != "flow/bits_per_dim":
            assert (r["ratio"] is not None) == HAVE_NORMFLOWS
    bpd = rows[-1]
    assert bpd["exact"] > 0 and bpd["skipped_steps"] == 0
    assert ("baseline_value" in bpd) == HAVE_NORMFLOWS


def test_suite_keys_are_the_yaml_keys_and_complete_configs_are_required():
    from lensflow.bench import flow as bf
    from lensflow.bench import stats as bs

    for name, mod in (("stats", bs), ("flow", bf)):
        assert set(mod.KEYS) | {"suite"} == set(_suite(name)), name
    with pytest.raises(ValueError, match="missing keys"):
        bs.run({"n_maps": 3})


def test_bench_cli_prints_the_table_and_writes_json(run_command, tmp_path):
    import json

    from lensflow.bench import main

    out = tmp_path / "rows.json"
    args = ["stats", "bench.n_maps=4", "bench.npix=16", "bench.baseline_maps=2", "bench.check_maps=2",
            "bench.repeats=1", "bench.threads=[1]", "bench.ell_nbins=4", f"out={out}"]  # fmt: skip
    res = run_command(main, *args)
    assert res.code == 0, res.err
    assert res.out[0].startswith("# lensflow bench stats on ") and res.out[-1] == f"# rows written to {out}"
    assert any(line.startswith("benchmark") for line in res.out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["numpy loop", "lensflow"]
    assert (out.stat().st_mode & 0o777) == (0o666 & ~_umask())
    code, err = run_command(main, "nosuch")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_bench_kl_scores_variants_against_the_exact_likelihood():
    """The crop Gaussian is the exact model of a lognormal field's Gaussian part: one step of a tiny Glow behind it
    is already far closer to the exact likelihood than the same Glow behind the DCT-diagonal filter."""
    from lensflow.bench import kl as bk

    glow = {"levels": 2, "steps": 1, "hidden": 8, "log_shift": True, "shift_method": "ml", "stationary": True}
    optim = {"lr": 1.0e-4, "warmup_steps": 1, "ema_decay": 0.5}
    cfg = _suite(
        "kl",
        data={**_suite("kl")["data"], "npix": 8, "pixel_arcmin": 6.0, "n_train": 3000, "n_val": 300},
        max_steps=1,
        batch_size=16,
        norm_maps=3000,
        eval_every=0,
        variants=[
            {"name": "filter", "model": glow, "optim": optim},
            {"name": "crop", "model": {**glow, "stationary_dense": True}, "optim": optim},
        ],
    )
    rows = bk.run(cfg)
    assert [r["variant"] for r in rows] == ["filter", "crop"] and rows[1]["baseline"] == "filter"
    for r in rows:
        assert r["unit"] == "bits/pixel" and r["se"] > 0 and math.isfinite(r["train_gap"]) and r["steps"] == 1
    assert math.isclose(rows[1]["ratio"], rows[1]["value"] / rows[0]["value"])
    assert rows[1]["value"] < 0.5 * rows[0]["value"]
    assert abs(rows[1]["value"]) < 5 * rows[1]["se"] + 0.002  # ~exact up to ξ's noise and one step


def test_bench_kl_with_a_teacher_scores_students_by_the_teachers_log_p(tiny_checkpoint, run_command, tmp_path):
    """Maps come from the teacher's sampler and the exact log p is the teacher's: a student trained 60 steps on the
    draws is closer to the teacher than one trained 1 step, and neither is closer than zero (KL >= 0)."""
    from lensflow.bench import kl as bk
    from lensflow.bench.__main__ import main
    from lensflow.emulator import Emulator

    glow = {"levels": 2, "steps": 1, "hidden": 8, "log_shift": False, "stationary": True, "stationary_dense": True}
    optim = {"lr": 1.0e-3, "warmup_steps": 5, "ema_decay": 0.9, "augment": False}  # the teacher is not isotropic
    data = {**_suite("kl_teacher")["data"], "teacher": str(tiny_checkpoint), "n_train": 600, "n_val": 300}
    data["symmetrize"] = False
    cfg = _suite("kl_teacher", data=data, batch_size=32, norm_maps=600, eval_every=0, variants=[
        {"name": "one-step", "model": glow, "optim": optim, "max_steps": 1},
        {"name": "trained", "model": glow, "optim": optim, "max_steps": 60, "n_train": 400},
    ])  # fmt: skip
    d = bk.simulate_data(cfg["data"])
    teacher = Emulator.load(tiny_checkpoint, device="cpu")
    np.testing.assert_array_equal(d["val"], teacher.sample(300, seed=1))  # generate's maps, seed 2·0 + 1
    np.testing.assert_allclose(d["val_exact"], teacher.log_prob(d["val"]), rtol=1e-12)
    rows = bk.run(cfg)
    assert [r["n_train"] for r in rows] == [600, 400] and rows[0]["data"] == str(tiny_checkpoint)
    one, trained = rows
    assert trained["value"] < one["value"] - 3 * one["se"]
    assert min(one["value"], trained["value"]) > -3 * max(one["se"], trained["se"])

    # the dihedral average is invariant under every turn, and at least p(x)/8
    sym = bk.dihedral_log_prob(teacher, d["val"][:20])
    for k in range(1, 8):
        np.testing.assert_allclose(bk.dihedral_log_prob(teacher, bk._dihedral(d["val"][:20], np.full(20, k))), sym)
    assert (sym >= d["val_exact"][:20] - np.log(8) - 1e-9).all()

    out = tmp_path / "kl.json"
    code, err = run_command(main, "kl", f"bench.data.teacher={tmp_path / 'nosuch.ckpt'}", f"out={out}")
    err = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "nosuch.ckpt: checkpoint not found" in err[0] and not out.exists()


def test_bench_kl_refuses_a_conditional_teacher_without_theta(tmp_path_factory, run_command, tmp_path):
    from helpers.stores import tiny_checkpoint

    from lensflow.bench.__main__ import main

    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("cond-teacher"), "cond", cond=("Omega_m", "sigma_8"))
    out = tmp_path / "kl.json"
    code, err = run_command(main, "kl_teacher", f"bench.data.teacher={ckpt}", f"out={out}")
    err = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert "is conditional on ['Omega_m', 'sigma_8']: give data.theta" in err[0] and not out.exists()
    code, err = run_command(main, "kl", f"bench.data.teacher={ckpt}", "bench.data.theta={Omega_m: 0.3}", f"out={out}")
    err = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "sigma_8" in err[0] and not out.exists(), err


def test_bench_validate_rows_are_failure_fractions_with_wilson_intervals():
    from lensflow.bench import validate as bv

    cfg = _suite(
        "validate", npix=16, pixel_arcmin=6.0, sizes=[24], null_pairs=3, power_pairs=2,
        departures=["gaussian", "tilt+5%", "T=0.95"], permutations=50,
    )  # fmt: skip
    rows = bv.run(cfg)  # no emulator: the T=0.95 row is skipped
    assert [(r["variant"], r["n_per_set"], r["pairs"]) for r in rows] == [
        ("null", 24, 3),
        ("gaussian", 24, 2),
        ("tilt+5%", 24, 2),
    ]
    for r in rows:
        assert 0 <= r["failing"] <= r["pairs"] and r["value"] == r["failing"] / r["pairs"]
        assert 0 <= r["ci95_low"] <= r["value"] <= r["ci95_high"] <= 1
    with pytest.raises(ValueError, match="unknown departure 'sigma_8\\+7%'"):
        bv.run({**cfg, "departures": ["gaussian", "sigma_8+7%"]})


def test_bench_pm_rows_time_the_step_and_a_whole_box():
    from lensflow.bench import pm

    assert set(pm.KEYS) | {"suite"} == set(_suite("pm"))
    cfg = {
        **{k: v for k, v in _suite("pm").items() if k != "suite"},
        "n_particles": [8],
        "box_runs": [],
        "steps": 2,
        "devices": ["cpu"],
    }
    rows = pm.run(cfg)
    assert [r["benchmark"] for r in rows] == ["pm/step"]
    assert rows[0]["value"] > 0 and rows[0]["unit"] == "steps/s"
    assert (rows[0]["ratio"] is None) == (pm.jaxpm_step(pm._initial(8, 8, 0), 8) is None)
