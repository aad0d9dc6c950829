"""Reliability under faults (issue 27): full disks, I/O errors, read-only outputs, SIGKILL and concurrent runs.

In the style of SQLite's I/O-error tests, each command (simulate, ingest, generate, validate, train; infer for the
output checks) runs with one fault injected and must then:

- end with exactly one ``error: ...`` line (the last line of stderr, no traceback, no crash) and exit code 2;
- leave no truncated file under a final name and no temporary beside it;
- leave the previous target intact, or a state that the same command, run again, finishes (generate resumes).

The faults:

- ``ENOSPC``/``EIO`` raised at the k-th write call, in process: an HDF5 dataset write (``h5py.Dataset.__setitem__``,
  every store), ``os.fsync`` (every atomic file: stores, JSON, HTML, figures' stats, checkpoints), ``torch.save``
  (checkpoints);
- a real full disk: a tmpfs of 64 KiB (root only; skipped when it cannot be mounted);
- a read-only output folder: a read-only tmpfs (root ignores ``chmod 0o555``);
- ``SIGKILL`` of a real process at a seeded random moment, then the same command again;
- a second run on the same target while the first holds it.

The default run takes a sample (k = 1 and 2, ENOSPC and EIO alternating, one kill moment per command), about a
minute and a half on 2 cores. ``LENSFLOW_FAULTS=full`` runs the full sweep (the ``slow`` cases: k = 1..6 with both
errors, three kill moments, every command for concurrency and read-only outputs)::

    LENSFLOW_FAULTS=full pytest tests/test_faults.py

Each test also names the issue-27 defect it guards (``defect N``); docs/reliability.md has the table and figures.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers.config import TINY_TRAIN

import lensflow.generate
import lensflow.infer
import lensflow.ingest
import lensflow.simulate
import lensflow.train
import lensflow.validate
from lensflow.mapstore import MapStoreWriter, StoreMeta, open_store, write_store

FULL = os.environ.get("LENSFLOW_FAULTS", "") == "full"
full_only = pytest.mark.skipif(not FULL, reason="the full fault sweep: LENSFLOW_FAULTS=full")

#: simulate: 24 Gaussian 16x16 maps (spectra cached after the first run: ~0.1 s)
SIM = ["n_maps=24", "npix=16", "sim=gaussian_flat", "sim.cosmology.m_nu=0", "batch_size=8", "progress=false"]
#: validate: the cheapest full run
VAL = [
    "statistics=[cl,pdf]",
    "smoothing_arcmin=[4.0]",
    "max_maps=40",
    "tolerances.permutations=null",
    "figures.enabled=false",
    "memorization.max_maps=40",
    "progress=false",
    "device=cpu",
]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("LENSFLOW_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def one_error(res, *needles: str) -> str:
    """The run ended with exactly one ``error:`` line (the last one), exit 2, no traceback; returns that line."""
    code, err = res
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert not any("Traceback" in line for line in err), err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def leftovers(folder: Path) -> list[Path]:
    """Temporaries and locks left in ``folder`` (recursively)."""
    return sorted(p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".lock")) or ".old-" in p.name)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", ro: bool = False):
    """A tmpfs mounted at ``path`` for the block (root only: skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` (with what it holds) read-only for the block: a read-only bind mount over itself."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    r = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def fail_at(monkeypatch, owner, name: str, k: int, err: int):
    """Make the k-th call of ``owner.name`` raise ``OSError(err)`` (the calls before and after it run)."""
    orig = getattr(owner, name)
    calls = {"n": 0, "hit": False}

    def wrapper(*a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            calls["hit"] = True
            raise OSError(err, os.strerror(err))
        return orig(*a, **kw)

    monkeypatch.setattr(owner, name, wrapper)
    try:
        yield calls
    finally:
        monkeypatch.setattr(owner, name, orig)


def cli(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    """``python -m lensflow.<module> args`` as a real process (stdout/stderr piped)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LENSFLOW_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", f"lensflow.{module}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, list[str], list[str]]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.strip().splitlines(), out.strip().splitlines()


def wait_for(cond, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def npy_inputs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"m{i}.npy", rng.normal(0, 0.02, (16, 16)).astype(np.float32))
    return folder


def ingest_args(src: Path, out: Path, *more: str) -> list[str]:
    return [f"input={src}", "format=npy", "pixel_arcmin=2.0", f"out={out}", "progress=false", *more]


def gen_args(ckpt: Path, out: Path, n: int = 32, *more: str) -> list[str]:
    return [f"ckpt={ckpt}", f"n_maps={n}", "batch_size=8", f"out={out}", "progress=false", "accelerator=cpu", *more]


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    from helpers.stores import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("cond"), "cond", cond=("Omega_m", "sigma_8"))


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return tmp_path_factory.mktemp("train-data")


def train_args(run_dir: Path, data_dir: Path, *more: str) -> list[str]:
    return [
        "+experiment=kappa_quick",
        *TINY_TRAIN,
        "check.final=false",
        "check.every=0",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        *more,
    ]


# --------------------------------------------------------------------------------------------
# The defects of issue 27, one regression test each
# --------------------------------------------------------------------------------------------


def test_concurrent_generate_is_refused_and_a_killed_run_frees_it(tiny_checkpoint, tmp_path, run_command):
    """defect 1: a second generate into the same out is refused in one line (the first is untouched); kill -9 of
    the first frees the target at once (its resume: test_sigkill_then_rerun)."""
    out = tmp_path / "g.h5"
    first = cli("generate", *gen_args(tiny_checkpoint, out, 20000), cwd=tmp_path)
    try:
        wait_for(lambda: (out.parent / "g.h5.parts").is_dir() or first.poll() is not None)
        assert first.poll() is None, finish(first)
        line = one_error(run_command(lensflow.generate.main, *gen_args(tiny_checkpoint, out, 20000)))
        assert "another lensflow run is writing it" in line and str(out) in line
        assert (out.parent / "g.h5.parts").is_dir() and not out.exists()  # the loser touched nothing
        assert first.poll() is None  # and the first runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    res = run_command(lensflow.generate.main, *gen_args(tiny_checkpoint, out, 16), "overwrite=true")
    assert res.code == 0, res.err
    with open_store(out) as st:
        assert len(st) == 16
    assert not leftovers(tmp_path) and not (tmp_path / "g.h5.parts").exists()


def test_full_disk_is_one_line_not_a_crash(tmp_path):
    """defect 2: simulate on a full disk (a 64 KiB tmpfs) exits 2 after one error line, not 139."""
    with tmpfs(tmp_path / "m", "64k") as m:
        code, err, _ = finish(cli("simulate", *SIM, "n_maps=400", f"out={m / 's.h5'}", cwd=tmp_path))
        one_error((code, err), "No space left on device", str(m / "s.h5"))
        assert list(m.iterdir()) == []


def test_full_disk_met_inside_hdf5_still_ends_with_one_line(tmp_path):
    """defect 2, the fallback: with the free-space guard off, HDF5 itself meets the full disk; the file it cannot
    close is parked and the command ends right after its error line (exit 2, never 139; HDF5's own messages about
    the freed datasets may precede it), with no temporary left."""
    script = (
        "import sys, lensflow._util.atomic as A\n"
        "A.SPACE_MARGIN = -(1 << 40)\n"
        "import lensflow.simulate as S\n"
        "sys.argv = ['simulate', *sys.argv[1:]]\n"
        "S.main()\n"
    )
    with tmpfs(tmp_path / "m", "64k") as m:
        r = subprocess.run(
            [sys.executable, "-c", script, *SIM, "n_maps=400", f"out={m / 's.h5'}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr[-2000:]
        assert err[-1].startswith("error: ") and "No space left on device" in err[-1], err[-3:]
        assert sum(line.startswith("error:") for line in err) == 1
        assert list(m.iterdir()) == []


def test_checkpoint_on_a_full_disk_leaves_the_previous_one_loadable(tmp_path):
    """defect 3: a checkpoint write that runs out of space leaves the previous file whole (Lightning's own IO
    copies a temporary from /tmp over it and leaves it truncated)."""
    from lensflow.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    with tmpfs(tmp_path / "ck", "600k") as ck:
        path = ck / "last.ckpt"
        io.save_checkpoint({"step": 1, "w": torch.zeros(100_000)}, path)  # 400 kB
        with pytest.raises(OSError) as e:
            io.save_checkpoint({"step": 2, "w": torch.ones(100_000)}, path)  # needs room for two copies
        assert e.value.errno == errno.ENOSPC
        assert torch.load(path, weights_only=True)["step"] == 1
        assert not leftovers(ck)


def test_train_saves_checkpoints_through_the_atomic_io(tmp_path, train_data, run_command, monkeypatch):
    """defect 3: the train command's Trainer uses AtomicCheckpointIO; a failed save (ENOSPC in torch.save at the
    second checkpoint) is one error line and leaves the first last.ckpt loadable."""
    run = tmp_path / "run"
    with fail_at(monkeypatch, torch, "save", 2, errno.ENOSPC) as calls:
        res = run_command(
            lensflow.train.main, *train_args(run, train_data, "callbacks.checkpoint.last_every_n_steps=1")
        )
    assert calls["hit"]
    one_error(res, "No space left on device")
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(torch.load(p, weights_only=False, map_location="cpu")["global_step"] >= 1 for p in ckpts)
    assert not leftovers(run)


def test_unwritable_outputs_are_one_line_naming_the_path(tmp_path, tiny_store, tiny_checkpoint, run_command):
    """defect 4: a read-only output folder is one error line naming the path, for every command, at entry."""
    src = npy_inputs(tmp_path / "in")
    with tmpfs(tmp_path / "ro", "64k", ro=True) as ro:
        cases = [
            (lensflow.simulate.main, [*SIM, f"out={ro / 's.h5'}"]),
            (lensflow.ingest.main, ingest_args(src, ro / "i.h5")),
            (lensflow.generate.main, gen_args(tiny_checkpoint, ro / "g.h5")),
            (
                lensflow.validate.main,
                [f"reference={tiny_store}", f"candidate={tiny_store}", f"out={ro / 'v'}", *VAL],
            ),
            (lensflow.infer.main, [f"ckpt={tiny_checkpoint}", f"maps={tiny_store}", f"out={ro / 'p'}"]),
            (lensflow.train.main, ["logger=csv", f"paths.output_dir={ro / 'runs'}"]),
        ]
        for main, args in cases:
            line = one_error(run_command(main, *args), str(ro))
            assert "Read-only file system" in line, line


def test_infer_split_can_be_set(tmp_path, run_command, compose):
    """defect 5: ``split`` of infer is a value, not the config group of the split fractions."""
    for split in ("all", "test"):
        assert compose("infer", f"split={split}", "ckpt=a", "maps=b", "out=c").split == split
    line = one_error(run_command(lensflow.infer.main, "ckpt=no.ckpt", "maps=no.h5", "out=o", "split=all"))
    assert "split" not in line and "no.ckpt" in line  # the missing checkpoint, not the split


@pytest.mark.parametrize(
    ("main", "arg", "near"),
    [
        (lensflow.simulate.main, "+n_map=5", "n_maps"),
        (lensflow.simulate.main, "n_map=5", "n_maps"),
        (lensflow.ingest.main, "+overwrit=true", "overwrite"),
        (lensflow.infer.main, "+max_map=3", "max_maps"),
        (lensflow.infer.main, "++grid_point=3", "grid_points"),
    ],
)
def test_unknown_added_keys_are_refused(main, arg, near, run_command):
    """defect 6: an unknown key is refused with or without ``+``, naming the nearest valid one (the old hint
    ``+n_map=5`` simulated 1,000 maps and exited 0)."""
    key = arg.lstrip("+").split("=")[0]
    one_error(run_command(main, arg, "out=o.h5"), f"unknown key '{key}'", f"did you mean '{near}'")
    assert not Path("o.h5").exists()


def test_train_added_trainer_key_is_checked(tmp_path, run_command):
    """defect 7: ``+trainer.max_step=5`` is one line naming trainer.max_steps, not an internal TypeError."""
    res = run_command(lensflow.train.main, "+trainer.max_step=5", "logger=csv", f"hydra.run.dir={tmp_path / 'r'}")
    one_error(res, "trainer.max_step", "trainer.max_steps")


def test_validate_against_itself_warns_on_the_console(tiny_store, tmp_path, run_command):
    """defect 8: reference = candidate passes, but says so on stderr (every summary warning reaches the console)."""
    import json

    out = tmp_path / "v"
    args = [f"reference={tiny_store}", f"candidate={tiny_store}", f"out={out}", *VAL]
    res = run_command(lensflow.validate.main, *args)
    assert res.code in (0, 1), res.err
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert any("share" in w for w in warnings)
    for w in warnings:
        assert f"warning: {w}" in res.err
    assert any("share" in line and "compares maps with themselves" in line for line in res.err)


def test_two_simulates_never_clobber(tmp_path, run_command):
    """defect 9: a second simulate while the first runs is refused; a target that appears meanwhile is never
    replaced (overwrite=false): the final step is a hard link, not a rename."""
    out = tmp_path / "s.h5"
    first = cli("simulate", *SIM, "n_maps=200000", "batch_size=64", f"out={out}", cwd=tmp_path)
    try:
        wait_for(lambda: any(tmp_path.glob(".s.h5.*.tmp")) or first.poll() is not None)
        assert first.poll() is None, finish(first)
        one_error(run_command(lensflow.simulate.main, *SIM, f"out={out}"), "another lensflow run is writing it")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    meta = StoreMeta(2.0, (1.0,))
    w = MapStoreWriter(out, meta, npix=8)
    w.append(np.zeros((2, 1, 8, 8), np.float32))
    write_store(tmp_path / "other.h5", np.ones((3, 1, 8, 8), np.float32), meta)
    os.link(tmp_path / "other.h5", out)  # another writer (not lensflow's lock) finished first
    with pytest.raises(FileExistsError, match="appeared while this run wrote it"):
        w.commit()
    with open_store(out) as st:
        assert len(st) == 3  # theirs, untouched


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, run_command):
    """defect 13: the hidden temporary of a kill -9'd simulate is removed by the next run on the same out."""
    out = tmp_path / "s.h5"
    first = cli("simulate", *SIM, "n_maps=200000", "batch_size=64", f"out={out}", cwd=tmp_path)
    wait_for(lambda: any(tmp_path.glob(".s.h5.*.tmp")) or first.poll() is not None)
    first.send_signal(signal.SIGKILL)
    first.wait()
    stale = list(tmp_path.glob(".s.h5.*.tmp"))
    assert stale
    res = run_command(lensflow.simulate.main, *SIM, f"out={out}")
    assert res.code == 0, res.err
    assert not any(p.exists() for p in stale) and not leftovers(tmp_path)
    assert any("removed" in line and stale[0].name in line for line in res.err)


def test_train_help_lists_every_experiment(run_command):
    """defect 16: ``train --help`` lists the experiments of conf/experiment/ (generated, so it cannot drift)."""
    res = run_command(lensflow.train.main, "--help")
    line = next(s for s in res.out if s.startswith("+experiment:"))
    names = sorted(p.stem for p in (Path(lensflow.__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
    assert line == "+experiment: " + " | ".join(names)
    assert "kappa_cpu" in line and "kappa_cond_cpu" in line


def test_results_go_to_stdout(tiny_checkpoint, tmp_path, run_command):
    """defect 17: generate's "wrote N maps" is a result (stdout), diagnostics stay on stderr."""
    res = run_command(lensflow.generate.main, *gen_args(tiny_checkpoint, tmp_path / "g.h5", 8))
    assert res.code == 0, res.err
    assert res.out == [f"wrote 8 mock maps to {tmp_path / 'g.h5'}"]
    assert not any("wrote" in line for line in res.err)


# --------------------------------------------------------------------------------------------
# The fault matrix: every command x injected write errors
# --------------------------------------------------------------------------------------------

WRITE_LAYERS = {
    "hdf5": (h5py.Dataset, "__setitem__"),
    "fsync": (os, "fsync"),
    "torch.save": (torch, "save"),
}


def _case(command: str, layer: str, k: int, err: int):
    return pytest.param(command, layer, k, err, id=f"{command}-{layer}-k{k}-{errno.errorcode[err]}")


SAMPLE = [
    _case("simulate", "hdf5", 1, errno.ENOSPC),
    _case("simulate", "fsync", 1, errno.EIO),
    _case("ingest", "hdf5", 2, errno.EIO),
    _case("ingest", "fsync", 1, errno.ENOSPC),
    _case("generate", "hdf5", 2, errno.ENOSPC),
    _case("generate", "fsync", 5, errno.EIO),
    _case("validate", "fsync", 1, errno.ENOSPC),
    _case("validate", "fsync", 2, errno.EIO),
    _case("train", "torch.save", 1, errno.ENOSPC),
]
SWEEP = [
    pytest.param(*_case(c, layer, k, e).values, marks=[pytest.mark.slow, full_only], id=_case(c, layer, k, e).id)
    for c, layers in (
        ("simulate", ("hdf5", "fsync")),
        ("ingest", ("hdf5", "fsync")),
        ("generate", ("hdf5", "fsync")),
        ("validate", ("fsync",)),
        ("train", ("torch.save", "fsync")),
    )
    for layer in layers
    for k in range(1, 7)
    for e in (errno.ENOSPC, errno.EIO)
    if _case(c, layer, k, e).id not in {p.id for p in SAMPLE}
]


@pytest.fixture
def world(tmp_path, tiny_store, tiny_checkpoint, train_data):
    """Each command's arguments and the check of what it left (previous target intact, or finishable)."""
    src = npy_inputs(tmp_path / "in")
    prev_sim = tmp_path / "s.h5"
    return {
        "simulate": (lensflow.simulate.main, [*SIM, f"out={prev_sim}", "overwrite=true"], prev_sim),
        "ingest": (lensflow.ingest.main, ingest_args(src, tmp_path / "i.h5", "overwrite=true"), tmp_path / "i.h5"),
        "generate": (lensflow.generate.main, gen_args(tiny_checkpoint, tmp_path / "g.h5"), None),
        "validate": (
            lensflow.validate.main,
            [f"reference={tiny_store}", f"candidate={tiny_store}", "candidate_split=val", f"out={tmp_path / 'v'}"]
            + VAL,
            None,
        ),
        "train": (lensflow.train.main, train_args(tmp_path / "run", train_data), None),
    }


@pytest.mark.parametrize(("command", "layer", "k", "err"), SAMPLE + SWEEP)
def test_write_fault(command, layer, k, err, world, tmp_path, run_command, monkeypatch):
    """An ENOSPC/EIO at the k-th write of a layer: one error line, exit 2, nothing truncated under a final name, the
    previous target intact (simulate, ingest overwrite an existing store), and the same command then finishes."""
    main, args, previous = world[command]
    if previous is not None:  # a good store the failing run would replace
        assert run_command(main, *args).code == 0
        before = digest(previous)
    owner, name = WRITE_LAYERS[layer]
    with fail_at(monkeypatch, owner, name, k, err) as calls:
        res = run_command(main, *args)
    if not calls["hit"]:
        assert res.code in (0, 1), res.err  # fewer than k writes: nothing to inject
        return
    if res.code in (0, 1) and layer == "fsync":
        # the folder's fsync after a rename failed: the file is whole and in place, which a warning says
        assert any(line.startswith("warning:") and os.strerror(err) in line for line in res.err), res.err
        assert not leftovers(tmp_path)
        return
    one_error(res, os.strerror(err))
    assert not leftovers(tmp_path), leftovers(tmp_path)
    if previous is not None:
        assert digest(previous) == before
    if command == "train":
        for p in (tmp_path / "run").rglob("*.ckpt"):
            torch.load(p, weights_only=False, map_location="cpu")  # whole, or not there
        return
    again = run_command(main, *args, *(["overwrite=true"] if command == "validate" else []))
    assert again.code in (0, 1), again.err  # validate: a verdict (pass or fail) is a finished run
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# Real processes: a real full disk, SIGKILL then rerun, a second run on the same target
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", ["generate", *(pytest.param(c, marks=[pytest.mark.slow, full_only]) for c in ("ingest", "validate"))]
)
def test_real_full_disk(command, tiny_checkpoint, tiny_store, tmp_path):
    """A real full disk (a 256 KiB tmpfs): one error line, exit 2 (never 139), no store, no temporary."""
    with tmpfs(tmp_path / "m", "256k") as m:
        if command == "generate":
            args = gen_args(tiny_checkpoint, m / "g.h5", 4000)
        elif command == "ingest":
            args = ingest_args(npy_inputs(tmp_path / "in", 8), m / "i.h5")
        else:
            args = [f"reference={tiny_store}", f"candidate={tiny_store}", f"out={m / 'v'}", *VAL]
        code, err, _ = finish(cli(command, *args, cwd=tmp_path))
        one_error((code, err), "No space left on device")
        assert not [p for p in m.rglob("*") if p.is_file() and p.suffix == ".h5" and p.parent == m]
        assert not leftovers(m)


KILLS = [
    pytest.param("simulate", 0, id="simulate-0"),
    pytest.param("generate", 0, id="generate-0"),
    *(
        pytest.param(c, s, marks=[pytest.mark.slow, full_only], id=f"{c}-{s}")
        for c in ("simulate", "generate", "ingest", "train", "validate")
        for s in (1, 2, 3)
    ),
]


@pytest.mark.parametrize(("command", "seed"), KILLS)
def test_sigkill_then_rerun(command, seed, tiny_checkpoint, tiny_store, train_data, tmp_path, run_command):
    """SIGKILL at a seeded random moment: nothing truncated under a final name, and the rerun finishes."""
    out = tmp_path / "o.h5"
    report = tmp_path / "v"
    big = {
        "validate": (lensflow.validate.main, [f"reference={tiny_store}", f"candidate={tiny_store}", f"out={report}"]),
        "simulate": (lensflow.simulate.main, [*SIM, "n_maps=3000", f"out={out}"]),
        "generate": (lensflow.generate.main, gen_args(tiny_checkpoint, out, 120)),
        "ingest": (lensflow.ingest.main, ingest_args(npy_inputs(tmp_path / "in", 400), out)),
        "train": (lensflow.train.main, train_args(tmp_path / "run", train_data, "trainer.max_steps=40")),
    }[command]
    proc = cli(command, *big[1], cwd=tmp_path)
    time.sleep(random.Random(seed).uniform(2.0, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        with open_store(out):
            pass  # a store under the final name is whole
    if command == "validate":  # a report folder is whole (summary.json readable) or the rerun replaces it
        if (report / "summary.json").exists():
            json.loads((report / "summary.json").read_text())
        res = run_command(big[0], *big[1], "overwrite=true")
        assert res.code in (0, 1), res.err  # a verdict, pass or fail, is a finished run
        assert not leftovers(tmp_path), leftovers(tmp_path)
        return
    if command == "train":
        last = next((tmp_path / "run").rglob("last.ckpt"), None)
        extra = [f"ckpt_path={last}"] if last else []
        if last:
            torch.load(last, weights_only=False, map_location="cpu")  # whole
        res = run_command(big[0], *train_args(tmp_path / "run2", train_data, "trainer.max_steps=40", *extra))
    else:
        res = run_command(big[0], *big[1])
    if out.exists() and res.code == 2 and "exists" in res.err[-1]:
        return  # the killed run had finished: its store is whole (checked above)
    assert res.code == 0, res.err
    assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.slow
@full_only
@pytest.mark.parametrize("command", ["ingest", "validate", "infer"])
def test_second_concurrent_run_is_refused(command, tiny_store, tiny_checkpoint, cond_ckpt, tmp_path, run_command):
    """A second run on a target another live process holds is refused in one line; the holder is untouched."""
    from lensflow._util.lock import lock_path

    out = tmp_path / ("o.h5" if command == "ingest" else "o")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from lensflow._util.lock import target_lock\n"
            "with target_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = {
            "ingest": (lensflow.ingest.main, ingest_args(npy_inputs(tmp_path / "in"), out)),
            "validate": (lensflow.validate.main, [f"reference={tiny_store}", f"candidate={tiny_store}", f"out={out}"]),
            "infer": (lensflow.infer.main, [f"ckpt={cond_ckpt}", f"maps={tiny_store}", f"out={out}"]),
        }[command]
        one_error(run_command(args[0], *args[1]), "another lensflow run is writing it")
        assert lock_path(out).exists() and not out.exists()
    finally:
        holder.kill()
        holder.wait()
