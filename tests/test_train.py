"""lensflow.train end to end: experiments, exact resume, non-finite guard, bad input, CLI, DDP on CPU."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers.config import TINY_TRAIN as TINY
from helpers.config import compose
from hydra.core.global_hydra import GlobalHydra

from lensflow.mapstore import open_store
from lensflow.model import KappaFlow
from lensflow.train import main, train
from lensflow.training import GlowModule, TrainingDivergedError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lensflow-data")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
    GlobalHydra.instance().clear()


class _Recorder(L.Callback):
    """Loss per optimizer step; optional early stop or crash at a step; optional checkpoint copy."""

    def __init__(self, stop_at=None, crash_at=None, copy_last_at=None, dest=None):
        self.losses = {}
        self.stop_at, self.crash_at, self.copy_last_at, self.dest = stop_at, crash_at, copy_last_at, dest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        # ModelCheckpoint runs after other callbacks: the last.ckpt of step k is there at step k + 1
        if self.copy_last_at is not None and trainer.global_step == self.copy_last_at + 1:
            shutil.copy(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", self.dest)
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True
        if self.crash_at is not None and trainer.global_step >= self.crash_at:
            raise RuntimeError("simulated crash")


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["kappa", "kappa_quick", "kappa_cond"])
def test_experiment_composes_and_trains_a_few_steps(experiment, data_dir, tmp_path):
    extra = []
    # the reference run trains in bf16-mixed on GPUs; CPU autocast takes that path too
    if experiment == "kappa":
        extra = ["trainer.precision=bf16-mixed"]
    if experiment == "kappa_cond":
        extra = ["data.simulate.n_maps=60", "data.simulate.grid={Omega_m:[0.28,0.34],sigma_8:[0.76,0.84]}"]
    paths = [f"paths.data_dir={data_dir}", f"paths.run_dir={tmp_path}"]
    cfg = compose("train", f"+experiment={experiment}", *TINY, *extra, *paths)
    assert cfg.name == experiment and cfg.model.log_shift
    res = train(cfg)
    assert res["global_step"] == 3
    best, last = Path(res["best_checkpoint"]), Path(res["last_checkpoint"])
    assert best.parent == last.parent == tmp_path / "checkpoints" and best.exists() and last.exists()
    summary = json.loads(Path(res["summary_path"]).read_text())
    assert np.isfinite(summary["best_val_bits_per_dim"])
    assert all(np.isfinite(summary["check"][k]) for k in ("cl_frac_max", "peaks_frac_max", "pdf_frac_max"))
    assert list((tmp_path / "checks").glob("epoch0000-step0000003*_stats.png"))
    samples = open_store(res["samples"])
    assert samples.n == 16 and samples.meta.kind == "mock"
    raw = torch.load(best, weights_only=True)
    assert raw["lensflow"]["model"] == "glow" and raw["lensflow"]["config"]["name"] == experiment
    assert raw["lensflow"]["data"]["store"] == res["store"]
    for mod in (GlowModule.load_from_checkpoint(best).model, KappaFlow.load(best)):
        assert mod.npix == 32 and mod.meta.pixel_arcmin == pytest.approx(3.28)
        if experiment == "kappa_cond":
            assert mod.param_names == ("Omega_m", "sigma_8") and mod.glow.cond_dim == 2
            x = mod.sample(2, cond={"Omega_m": 0.3, "sigma_8": 0.8})
        else:
            assert mod.param_names == ()
            x = mod.sample(2)
        assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------


def test_resume_gives_the_same_losses_and_weights(data_dir, tmp_path):
    # 320 training maps / 16 = 20 batches per epoch: checkpoints at steps 7 and 10 are mid-epoch, and
    # the runs cross into the next epoch (new data order) after the resume.
    base = [
        *TINY,
        "trainer.max_steps=26",
        "trainer.limit_train_batches=null",
        "trainer.deterministic=true",
        "check.every=0",
        "check.final=false",
        f"paths.data_dir={data_dir}",
        "seed=3",
    ]
    ref = _Recorder()
    a = train(compose("train", *base, f"paths.run_dir={tmp_path / 'a'}"), callbacks=[ref])
    assert sorted(ref.losses) == list(range(1, 27))

    # Interrupted run: a periodic last.ckpt at step 7 (copied aside), stopped after step 10.
    part = _Recorder(stop_at=10, copy_last_at=7, dest=tmp_path / "step7.ckpt")
    train(
        compose("train", *base, f"paths.run_dir={tmp_path / 'b'}", "callbacks.checkpoint.last_every_n_steps=7"),
        callbacks=[part],
    )
    assert max(part.losses) == 10
    for start, ckpt in ((10, tmp_path / "b" / "checkpoints" / "last.ckpt"), (7, tmp_path / "step7.ckpt")):
        assert torch.load(ckpt, weights_only=True)["global_step"] == start
        rec = _Recorder()
        cfg = compose("train", *base, f"paths.run_dir={tmp_path / f'c{start}'}", f"ckpt_path={ckpt}")
        c = train(cfg, callbacks=[rec])
        assert sorted(rec.losses) == list(range(start + 1, 27))
        assert [rec.losses[s] for s in rec.losses] == [ref.losses[s] for s in rec.losses]
        sa = torch.load(a["last_checkpoint"], weights_only=True)["state_dict"]
        sc = torch.load(c["last_checkpoint"], weights_only=True)["state_dict"]
        assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)  # raw and EMA weights


# --------------------------------------------------------------------------------------------
# Non-finite guard
# --------------------------------------------------------------------------------------------


class _Poison(L.Callback):
    """Turns the training batches of the given steps (0-based optimizer step at batch start) into NaN."""

    def __init__(self, steps):
        self.steps = steps
        self.calls = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls += 1
        if self.calls - 1 in self.steps:
            batch["kappa"].fill_(float("nan"))


def _all_finite(ckpt):
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())


def test_nonfinite_steps_are_skipped_and_counted(data_dir, tmp_path):
    cfg = compose(
        "train",
        *TINY,
        "trainer.max_steps=6",
        "trainer.limit_train_batches=null",
        "check.final=false",
        f"paths.data_dir={data_dir}",
        f"paths.run_dir={tmp_path}",
    )
    res = train(cfg, callbacks=[_Poison({1, 2, 3})])
    assert res["global_step"] == 6  # the 3 poisoned batches did not count as optimizer steps
    assert res["summary"]["skipped_steps"] == 3
    assert _all_finite(res["last_checkpoint"])
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 3


def test_a_stream_of_nonfinite_losses_stops_the_run(data_dir, tmp_path):
    cfg = compose(
        "train",
        *TINY,
        "trainer.max_steps=50",
        "trainer.limit_train_batches=null",
        "optim.max_nonfinite_steps=4",
        "callbacks.checkpoint.last_every_n_steps=1",
        f"paths.data_dir={data_dir}",
        f"paths.run_dir={tmp_path}",
    )
    with pytest.raises(TrainingDivergedError, match="4 steps in a row with a non-finite loss"):
        train(cfg, callbacks=[_Poison(set(range(2, 1000)))])
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts  # the steps before the stream were saved ...
    assert all(_all_finite(p) for p in ckpts)  # ... and nothing with NaN/Inf was written
    assert all(torch.load(p, weights_only=True)["global_step"] <= 2 for p in ckpts)


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2
# --------------------------------------------------------------------------------------------


def _other_model_ckpt(path, hidden):
    meta = {"pixel_arcmin": 3.28, "source_redshifts": [1.0], "periodic": False}
    mod = GlowModule(model={"levels": 2, "steps": 1, "hidden": hidden}, meta=meta, npix=32)
    torch.save(
        {
            "state_dict": mod.state_dict(),
            "hyper_parameters": dict(mod.hparams),
            "lensflow": {"model": "glow", "version": "0"},
        },
        path,
    )
    return path


def test_bad_input_gives_one_line(monkeypatch, run_command, tmp_path, tiny_store):
    import h5py

    monkeypatch.chdir(tmp_path)

    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f["maps"] = np.zeros((2, 8, 8))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    small = [*TINY, f"data.path={tiny_store}"]
    cases = [
        (["data.path=/no/such/store.h5"], "/no/such/store.h5: map store not found"),
        (["data=store"], "data.simulate_if_missing=false"),
        ([f"data.path={tmp_path / 'wrong.h5'}"], "schema_version"),
        (["model.stepz=8"], "unknown key 'model.stepz' (did you mean 'model.steps'?)"),
        (["trainer=tpu"], "Could not find 'trainer/tpu'"),
        (["model.hidden=big"], "model.hidden must be an integer"),
        ([*small, f"ckpt_path={tmp_path / 'foreign.ckpt'}"], "not a lensflow checkpoint"),
        (
            [*small, f"ckpt_path={_other_model_ckpt(tmp_path / 'other.ckpt', 16)}"],
            "checkpoint of another model: model.hidden=16 in the checkpoint, 8 here",
        ),
    ]
    for args, msg in cases:
        code, err = run_command(main, *args, f"hydra.run.dir={tmp_path / 'run'}")
        assert code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (args, err)


# --------------------------------------------------------------------------------------------
# Real processes: the CLI as written, and DDP with two CPU processes
# --------------------------------------------------------------------------------------------


def _env(tmp_path):
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path),
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def test_wandb_mode(monkeypatch):
    from lensflow.training.loggers import wandb_mode as _wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert _wandb_mode(None) == "offline"  # no network unless asked for
    monkeypatch.setenv("WANDB_MODE", "online")
    assert _wandb_mode(None) == "online"  # WANDB_MODE honoured
    assert _wandb_mode(True) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode(None) == "disabled" and _wandb_mode(False) == "online"


def test_cli_typo_is_one_line_and_exit_code_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lensflow.train", "+experiment=kappa_quick", "optim.lrr=1"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: config: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"]


@pytest.mark.slow
def test_cli_kappa_quick_leaves_a_loadable_checkpoint(tmp_path, data_dir):
    shrink = [
        "data.simulate.n_maps=300",
        "data.simulate.npix=32",
        "data.simulate.sim.cosmology.m_nu=0.0",
        "data.max_val_maps=32",
        "model.steps=2",
        "model.hidden=16",
        "trainer.val_check_interval=10",
        "check.n_samples=16",
        "check.every=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    cmd = [sys.executable, "-m", "lensflow.train", "+experiment=kappa_quick", "trainer.max_steps=20", *shrink]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    pairs = [ln.split(":", 1) for ln in r.stdout.splitlines() if ":" in ln]
    lines = {k.strip(): v.strip() for k, v in pairs}
    best = Path(lines["best checkpoint"])
    run_dir = Path(lines["run folder"])
    assert run_dir.parent == tmp_path / "out" / "train" / "kappa_quick"
    assert best.parent == run_dir / "checkpoints"
    # the short validation summary, in errors a user can judge (issue 26.7), and no advert or foreign warning
    assert all(f"    {k} " in r.stdout for k in ("C_ell", "peak counts", "pixel PDF"))
    assert r.stdout.count("max |z| ") == 3 and "max / mean over bins" not in r.stdout
    for noise in ("litlogger", "anonymous setting", "LeafSpec"):
        assert noise not in r.stderr, noise
    assert Path(lines["samples"].split(" (")[0]).exists() and Path(lines["summary"]).exists()
    assert GlowModule.load_from_checkpoint(best).npix == 32
    assert KappaFlow.load(best).sample(2).shape == (2, 1, 32, 32)
    assert (run_dir / ".hydra" / "config.yaml").exists()
    runs = list((run_dir / "wandb").glob("offline-run-*"))  # wandb offline, inside the run folder
    assert len(runs) == 1 and list(runs[0].rglob("*.png"))  # with the check images logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 20 and open_store(summary["samples"]).n == 16
    # The simulated store is cached: a second command finds it without simulating again.
    store = Path(summary["store"])
    assert store.parent == tmp_path / "data" and store.name.startswith("sim-")
    mtime = store.stat().st_mtime_ns
    r2 = subprocess.run(
        [*cmd, "prepare_only=true"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 0 and f"training store ready: {store}" in r2.stdout
    assert store.stat().st_mtime_ns == mtime and "simulate" not in r2.stderr


@pytest.mark.slow
def test_ddp_cpu_two_processes_stay_in_sync(tmp_path, data_dir):
    cmd = [
        sys.executable,
        "-m",
        "lensflow.train",
        *TINY,
        "trainer=ddp_cpu",
        "trainer.max_steps=12",
        "trainer.limit_train_batches=null",
        "optim.lr=3e-3",
        "check.final=false",
        "callbacks.param_digest=true",
        f"paths.data_dir={data_dir}",
        f"paths.run_dir={tmp_path / 'run'}",
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    dig = json.loads((tmp_path / "run" / "param_digest.json").read_text())
    assert dig["world_size"] == 2 and dig["global_step"] == 12
    assert len(set(dig["pids"])) == 2  # two processes ...
    # ... holding identical weights
    assert len(dig["digests"]) == 2 and dig["digests"][0] == dig["digests"][1]
    key = "train/bits_per_dim_step"
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if r.get(key)]
    loss = [float(r[key]) for r in rows]
    assert len(loss) == 12 and np.mean(loss[-3:]) < np.mean(loss[:3])
    # the checkpoint holds exactly those weights
    from lensflow.training.callbacks import ParamDigest

    last = GlowModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ParamDigest.digest(last).hex() == dig["digests"][0]


# --------------------------------------------------------------------------------------------
# One default per knob; output modes
# --------------------------------------------------------------------------------------------


def test_the_command_line_composes_the_library_defaults():
    """``model=glow``, ``optim=adamw``, ``check`` and ``callbacks=default`` are the settings' own defaults (taken as
    nodes), and ``model=glow_small`` changes only the sizes it names."""
    from lensflow.training.callbacks import CallbackSettings
    from lensflow.training.settings import CheckSettings, ModelSettings, OptimSettings

    cfg = compose("train")
    assert ModelSettings.from_config(cfg.model) == ModelSettings()
    assert OptimSettings.from_config(cfg.optim) == OptimSettings()
    assert CheckSettings.from_config(cfg.check) == CheckSettings()
    assert CallbackSettings.from_config(cfg.callbacks) == CallbackSettings.from_config({})
    small = ModelSettings.from_config(compose("train", "model=glow_small").model)
    assert small == dataclasses.replace(ModelSettings(), levels=3, steps=8, hidden=64)


def test_train_outputs_are_readable_by_the_group_under_umask_022(data_dir, tmp_path):
    cfg = compose("train", *TINY, f"paths.data_dir={data_dir}", f"paths.run_dir={tmp_path}")
    old = os.umask(0o022)
    try:
        res = train(cfg)
    finally:
        os.umask(old)
    files = [Path(res["summary_path"]), Path(res["samples"]), Path(res["best_checkpoint"])]
    files += [tmp_path / "final.json", tmp_path / "final_maps.png", tmp_path / "final_stats.png"]
    files += sorted((tmp_path / "checks").iterdir())
    assert len(files) > 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_the_final_verdict_clusters_maps_that_share_a_box():
    """Training's end-of-run verdict takes the validation maps' box ids, as ``validate`` does: 8 boxes whose 25 maps
    share an amplitude (between-box scatter 30 %) against 200 independent maps of the same marginal fail with
    errors for independent maps and pass with clustered ones, which warn that 8 boxes are few."""
    from lensflow.mapstore import StoreMeta
    from lensflow.training.sample_check import full_verdict

    rng = np.random.default_rng(3)
    k = np.fft.fftfreq(32)
    kernel = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * 200.0)

    def field(n):
        white = rng.normal(size=(n, 1, 32, 32))
        return np.fft.ifft2(np.fft.fft2(white) * kernel).real

    amp_ref = np.repeat(1 + 0.3 * rng.standard_normal(8), 25)
    ref = field(200) * amp_ref[:, None, None, None]
    cand = field(200) * (1 + 0.3 * rng.standard_normal(200))[:, None, None, None]
    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=(1.0,), periodic=True)
    boxes = np.repeat(np.arange(8), 25)
    independent = full_verdict(ref.astype(np.float32), cand.astype(np.float32), meta, seed=0)
    clustered = full_verdict(ref.astype(np.float32), cand.astype(np.float32), meta, seed=0, ref_groups=boxes)
    assert independent["pass"] is False
    assert clustered["pass"] is True, clustered["failures"]
    assert independent["warnings"] == [] and "from 8 realizations" in clustered["warnings"][0]
    # the logged z of the sample check is the clustered one too, smaller with the between-box scatter
    from lensflow.training.sample_check import compare_maps, metrics_of
    from lensflow.validation import MeasureOptions

    options = MeasureOptions.from_config({"statistics": ["cl"], "smoothing_arcmin": [2.0]})
    result, _ = compare_maps(ref.astype(np.float32), cand.astype(np.float32), options, meta, 0, (boxes, None))
    assert metrics_of(result, grouped=True)["cl_z_max"] < 0.6 * metrics_of(result)["cl_z_max"]
