"""The KL gap as a first-class metric: training logs it, summary.json and the console report it, and validate's
field-level check computes it, each equal to an independent computation from the exact likelihood."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.config import TINY_TRAIN, compose
from helpers.stores import noise_store, train_tiny

import lensflow
from lensflow.mapstore import open_store
from lensflow.sims.truth import StoreTruth

# the shared tiny run, trained 4 steps with the KL gap on 24 validation and 12 training maps and no in-training check
TINY_KL = [
    *TINY_TRAIN,
    "trainer.max_steps=4",
    "trainer.limit_train_batches=4",
    "check.every=0",
    "check.kl_maps=24",
    "check.kl_train_maps=12",
]


def _independent_gap(ckpt, store_path, split: str, n: int) -> float:
    with open_store(store_path) as st:
        idx = st.indices(split)[:n]
        maps = st.read(idx)
        exact = StoreTruth(st.meta).log_prob(maps)
    model = lensflow.load(ckpt, device="cpu").log_prob(maps)
    return float(np.mean(exact - model) / (maps[0].size * math.log(2.0)))


def test_a_tiny_training_run_reports_its_kl_gap(tiny_store, tmp_path):
    from lensflow.report.text import train_summary_text
    from lensflow.training import train

    cfg = compose("train", *TINY_KL, f"data.path={tiny_store}", f"paths.run_dir={tmp_path / 'r'}")
    res = train(cfg)
    kl = res["summary"]["kl"]
    assert kl["available"] and kl["val_kl_maps"] == 24 and kl["train_kl_maps"] == 12
    assert kl["val_kl_se"] > 0 and math.isfinite(kl["train_kl_bits_per_dim"])
    # the best checkpoint's gap, recomputed from the simulator and lensflow.load
    want = _independent_gap(res["best_checkpoint"], tiny_store, "val", 24)
    assert kl["val_kl_bits_per_dim"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    on_disk = json.loads(open(res["summary_path"]).read())["kl"]
    assert on_disk["val_kl_bits_per_dim"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert "KL gap vs the exact likelihood: held-out" in train_summary_text(res)
    # logged at every validation (the csv logger's metrics)
    metrics = next((tmp_path / "r").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"val/kl_bits_per_dim", "val/kl_se", "train/kl_bits_per_dim"} <= set(metrics)


def test_a_store_without_an_exact_likelihood_says_so(tmp_path):
    from lensflow.training import train

    store = noise_store(tmp_path / "noise.h5", n=64, npix=16)
    cfg = compose("train", *TINY_KL, f"data.path={store}", f"paths.run_dir={tmp_path / 'r'}")
    kl = train(cfg)["summary"]["kl"]
    assert kl["available"] is False and "not written by a built-in flat simulator" in kl["reason"]


# --------------------------------------------------------------------------------------------
# validate emulator=PATH: the field-level check
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator_of_tiny_store(tiny_store, tmp_path_factory):
    module, trainer = train_tiny(tiny_store, model={"levels": 2, "steps": 1, "hidden": 8}, steps=3)
    path = tmp_path_factory.mktemp("field") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_validate_reports_and_gates_the_field_level_kl_gap(tiny_store, emulator_of_tiny_store, tmp_path, run_command):
    from lensflow.validate import main

    base = [
        f"reference={tiny_store}",
        f"candidate={tiny_store}",
        "candidate_split=val",
        f"emulator={emulator_of_tiny_store}",
        "figures.enabled=false",
        "progress=false",
        "device=cpu",
        "tolerances.permutations=50",
    ]
    res = run_command(main, *base, f"out={tmp_path / 'a'}")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    field = summary["field"]
    want = _independent_gap(emulator_of_tiny_store, tiny_store, "test", 1000)
    assert field["kl_bits_per_dim"] == pytest.approx(want, rel=1e-6, abs=1e-9) and field["kl_se"] > 0
    assert field["n_maps"] == open_store(tiny_store).indices("test").size and not field["gating"]
    # the test split of a 400-map store is small: the verdict says its power is low
    assert summary["low_power"] and "fewer than 200" in summary["low_power"][0]
    assert any("warning: low power" in line for line in res.err)
    strict = run_command(main, *base, f"out={tmp_path / 'b'}", "field.kl_tolerance=1e-9")
    assert strict.code == 1 and any("field: KL gap" in line for line in strict.out)  # the verdict: stdout


def test_validate_field_check_needs_a_simulated_reference(emulator_of_tiny_store, tmp_path, run_command):
    from lensflow.validate import main

    ref = noise_store(tmp_path / "ref.h5", n=40, npix=32, pixel_arcmin=3.28)
    res = run_command(
        main,
        f"reference={ref}",
        "reference_split=all",
        f"candidate={ref}",
        f"emulator={emulator_of_tiny_store}",
        f"out={tmp_path / 'o'}",
        "figures.enabled=false",
        "progress=false",
        "tolerances.permutations=20",
    )
    assert res.code == 2 and len(res.err) == 1 and "no exact likelihood" in res.err[0], res.err


def test_validate_scores_a_student_against_a_teacher(tiny_checkpoint, tmp_path, run_command):
    """``field.teacher``: the reference maps are a trained emulator's draws, and its log p is their exact likelihood
    (a non-Gaussian yardstick): the teacher scored against itself has a gap of exactly 0, another model its KL gap."""
    from helpers.stores import tiny_checkpoint as make_checkpoint

    from lensflow.emulator import Emulator
    from lensflow.mapstore import write_store
    from lensflow.validate import main

    teacher = Emulator.load(tiny_checkpoint, device="cpu")
    maps = teacher.sample(120, seed=3)
    ref = write_store(tmp_path / "teacher_mocks.h5", maps, teacher.meta, split=np.full(120, 2))
    student = make_checkpoint(tmp_path, "student", 1, (), periodic=True, perturb=0.1)
    base = [f"reference={ref}", "reference_split=all", f"candidate={ref}", f"field.teacher={tiny_checkpoint}"]
    base += ["figures.enabled=false", "progress=false", "device=cpu", "tolerances.permutations=20"]
    for who, ckpt in (("self", tiny_checkpoint), ("student", student)):
        res = run_command(main, *base, f"emulator={ckpt}", f"out={tmp_path / who}")
        assert res.code in (0, 1), res.err
        field = json.loads((tmp_path / who / "summary.json").read_text())["field"]
        want = np.mean(teacher.log_prob(maps) - Emulator.load(ckpt, device="cpu").log_prob(maps)) / (
            maps[0].size * math.log(2)
        )
        assert field["kl_bits_per_dim"] == pytest.approx(want, abs=1e-9) and field["truth"].startswith("teacher")
    assert json.loads((tmp_path / "self" / "summary.json").read_text())["field"]["kl_bits_per_dim"] == 0.0
    assert field["kl_bits_per_dim"] > 3 * field["kl_se"]


def test_a_conditional_teacher_needs_the_reference_parameters(tmp_path_factory, tiny_store, tmp_path, run_command):
    from helpers.stores import tiny_checkpoint as make_checkpoint

    from lensflow.validate import main

    cond = make_checkpoint(tmp_path_factory.mktemp("cond-teacher"), "cond", cond=("Omega_m", "sigma_8"))
    ref = noise_store(tmp_path / "ref.h5", n=40, npix=16)
    res = run_command(
        main,
        f"reference={ref}",
        "reference_split=all",
        f"candidate={ref}",
        f"emulator={cond}",
        f"field.teacher={cond}",
        f"out={tmp_path / 'o'}",
        "figures.enabled=false",
        "progress=false",
        "tolerances.permutations=20",
    )
    assert res.code == 2 and len(res.err) == 1 and "is conditional on ['Omega_m', 'sigma_8']" in res.err[0], res.err
