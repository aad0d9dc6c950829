"""Mock generation: schema and provenance, determinism per (seed, i), resume after SIGKILL, conditional
grids, non-finite redraws, shape noise, FITS read back by ingest, several processes, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.config import compose
from helpers.stores import tiny_checkpoint

import lensflow
import lensflow.generate as gen
from lensflow.generation import GenerationError, generate, job, latent_noise, sample_maps, stream_seed
from lensflow.mapstore import StoreMeta, open_store
from lensflow.model import KappaFlow

NPIX = 16
#: The generate overrides of every test here (the CLI tests pass their own).
ON_CPU = ("progress=false", "accelerator=cpu", "devices=1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ckpts")
    return {
        "uncond": tiny_checkpoint(tmp, "uncond", 1, (), periodic=True),
        "cond": tiny_checkpoint(tmp, "cond", 2, ("Omega_m", "sigma_8"), periodic=False),
    }


def _left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


# --------------------------------------------------------------------------------------------
# Schema, provenance, determinism
# --------------------------------------------------------------------------------------------


def test_schema_and_provenance(tmp_path, ckpts):
    ck = ckpts["uncond"]
    out = generate(
        compose(
            "generate",
            *ON_CPU,
            ckpt=str(ck),
            n_maps=10,
            batch_size=4,
            seed=5,
            temperature=0.9,
            out=str(tmp_path / "m.h5"),
        )
    )
    assert out == tmp_path / "m.h5" and _left(tmp_path) == ["m.h5"]  # work folder removed
    st = open_store(out)
    train_meta = open_store(ck.with_suffix(".h5")).meta
    assert st.shape == (10, 1, NPIX, NPIX)
    assert st.meta.kind == "mock" and st.meta.param_names == ()
    assert st.meta.pixel_arcmin == train_meta.pixel_arcmin and st.meta.source_redshifts == (0.5,)
    assert st.meta.periodic is True
    np.testing.assert_array_equal(st.read_realization(), np.arange(10))
    st.check_values()
    cb = st.meta.created_by
    assert cb["config"]["n_maps"] == 10 and cb["config"]["seed"] == 5 and "versions" in cb and "command" in cb
    ex = st.meta.extra
    assert ex["checkpoint"] == str(ck.resolve())
    assert ex["checkpoint_sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert (ex["seed"], ex["temperature"], ex["weights"]) == (5, 0.9, "ema")
    assert ex["lensflow_version"] == lensflow.__version__
    assert ex["training"]["store"] == str(ck.with_suffix(".h5").resolve())
    assert ex["nonfinite_redraws"] == 0 and ex["noise"] is None


def test_map_depends_only_on_seed_and_index(tmp_path, ckpts):
    ck = ckpts["uncond"]
    a = open_store(
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=9, batch_size=4, out=str(tmp_path / "a.h5")))
    ).read()
    b = open_store(
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=9, batch_size=4, out=str(tmp_path / "b.h5")))
    ).read()
    np.testing.assert_array_equal(a, b)  # same request, same batch layout: bit-identical
    c = open_store(
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=9, batch_size=3, out=str(tmp_path / "c.h5")))
    ).read()
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())  # other batch size: round-off
    d = open_store(
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=9, batch_size=4, seed=1, out=str(tmp_path / "d.h5")))
    ).read()
    assert np.abs(d - a).min(axis=(1, 2, 3)).max() > 0 and not np.allclose(d, a)
    # The notebook API gives the CLI's maps; fewer maps give a prefix.
    np.testing.assert_allclose(
        sample_maps(ck, 5, batch_size=2, device="cpu"), a[:5], rtol=1e-5, atol=1e-6 * np.abs(a).max()
    )
    # Brute force: map 7 alone, from its documented stream, through the module's own sampler.
    module = KappaFlow.load(ck)
    g = torch.Generator().manual_seed(
        int.from_bytes(np.random.SeedSequence([0, 7, 0]).generate_state(2, np.uint32).astype("<u4").tobytes(), "little")
    )
    z = torch.randn(1, NPIX * NPIX, generator=g)
    assert stream_seed(0, 7) == g.initial_seed()
    np.testing.assert_allclose(module.sample(1, noise=z).numpy()[0], a[7], rtol=1e-5, atol=1e-6 * np.abs(a).max())
    # Raw weights differ from the EMA weights after 3 steps (EMA decay (1+t)/(10+t)).
    raw = sample_maps(module, 2, ema=False, device="cpu")
    assert not np.allclose(raw, a[:2])


def test_temperature_scales_latents(ckpts):
    module = KappaFlow.load(ckpts["uncond"])
    z = latent_noise(0, [0, 1, 2], NPIX * NPIX)
    np.testing.assert_allclose(
        sample_maps(module, 3, temperature=0.5, device="cpu"),
        module.sample(3, noise=0.5 * z).numpy(),
        rtol=1e-5,
        atol=1e-7,
    )


# --------------------------------------------------------------------------------------------
# Resume after a kill, and refusing a different request
# --------------------------------------------------------------------------------------------


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, ckpts):
    ck = ckpts["uncond"]
    out = tmp_path / "m.h5"
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        from omegaconf import OmegaConf
        torch.set_num_threads(1)  # as in this process: bit-identical maps need the same kernels
        import lensflow.generation as g
        from lensflow.mapstore import MapStoreWriter
        commit = MapStoreWriter.commit
        def kill_in_third_part(self):
            if self.path.name == "part-000000002.h5":  # inside the writer of the 3rd batch, before its rename
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(self)
        MapStoreWriter.commit = kill_in_third_part
        g.generate(OmegaConf.create(dict(ckpt={str(ck)!r}, n_maps=11, batch_size=3, seed=2, out={str(out)!r},
                                         progress=False, devices=1, accelerator="cpu")))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr
    parts = tmp_path / "m.h5.parts"
    assert not out.exists()
    names = sorted(p.name for p in parts.iterdir())
    assert any(n.startswith(".part-000000002.h5.") and n.endswith(".tmp") for n in names)  # killed mid-write
    assert [n for n in names if n.startswith("part-")] == ["part-000000000.h5", "part-000000001.h5"]
    for b in (0, 1):  # the finished batches are valid, readable stores
        st = open_store(parts / f"part-{b:09d}.h5")
        assert st.n == 3 and np.array_equal(st.read_realization(), np.arange(3 * b, 3 * b + 3))
    # A different request is refused while the unfinished one is there ...
    with pytest.raises(ValueError, match="differs in seed"):
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=11, batch_size=3, seed=3, out=str(out)))
    assert not out.exists() and (parts / "part-000000001.h5").exists()
    # ... and the same command completes it: equal to an uninterrupted run, no duplicates, no leftovers.
    generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=11, batch_size=3, seed=2, out=str(out)))
    full = generate(
        compose("generate", *ON_CPU, ckpt=str(ck), n_maps=11, batch_size=3, seed=2, out=str(tmp_path / "full.h5"))
    )
    np.testing.assert_array_equal(open_store(out).read(), open_store(full).read())
    np.testing.assert_array_equal(open_store(out).read_realization(), np.arange(11))
    np.testing.assert_array_equal(open_store(out).split, open_store(full).split)
    assert _left(tmp_path) == ["full.h5", "m.h5"]


def test_exception_mid_run_then_overwrite_discards_other_request(tmp_path, ckpts, monkeypatch):
    ck = ckpts["uncond"]
    out = tmp_path / "m.h5"

    write_part = job.write_part

    def boom(plan, b, *args):
        if b == 1:  # batch 1 sampled, before its part is written
            raise RuntimeError("simulated crash")
        write_part(plan, b, *args)

    monkeypatch.setattr(job, "write_part", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=6, batch_size=2, out=str(out)))
    monkeypatch.setattr(job, "write_part", write_part)
    parts = tmp_path / "m.h5.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("part-*")) == ["part-000000000.h5"]

    # overwrite=true discards the unfinished run of another request (here: another seed) ...
    remove_work_folder = job.remove_work_folder

    def after_merge(plan):
        raise RuntimeError("killed after the output was renamed into place")

    monkeypatch.setattr(job, "remove_work_folder", after_merge)
    with pytest.raises(RuntimeError, match="renamed into place"):
        generate(
            compose("generate", *ON_CPU, ckpt=str(ck), n_maps=6, batch_size=2, seed=4, out=str(out), overwrite=True)
        )
    monkeypatch.setattr(job, "remove_work_folder", remove_work_folder)
    ref = sample_maps(ck, 6, seed=4, batch_size=2, device="cpu")
    np.testing.assert_array_equal(open_store(out).read(), ref)
    assert _left(tmp_path) == ["m.h5", "m.h5.parts"]
    # ... and a run killed between the final rename and the clean-up is recognised as complete.
    generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=6, batch_size=2, seed=4, out=str(out)))
    assert _left(tmp_path) == ["m.h5"]
    np.testing.assert_array_equal(open_store(out).read(), ref)


# --------------------------------------------------------------------------------------------
# Conditions, non-finite redraws, shape noise
# --------------------------------------------------------------------------------------------


def test_conditional_grid(tmp_path, ckpts):
    ck = ckpts["cond"]
    out = generate(
        compose(
            "generate",
            *ON_CPU,
            ckpt=str(ck),
            n_maps=3,
            batch_size=4,
            out=str(tmp_path / "g.h5"),
            cond={"sigma_8": [0.75, 0.85], "Omega_m": [0.25, 0.35]},
        )
    )
    st = open_store(out)
    assert st.meta.param_names == ("Omega_m", "sigma_8") and st.shape == (12, 2, NPIX, NPIX)
    # Cartesian product in the model's parameter order (Omega_m slowest), n_maps per condition.
    want = np.repeat([[0.25, 0.75], [0.25, 0.85], [0.35, 0.75], [0.35, 0.85]], 3, axis=0)
    np.testing.assert_allclose(st.read_params(), want, rtol=1e-6)
    assert st.meta.extra["conditions"]["values"] == want[::3].tolist()
    maps = st.read()
    # Each map from its own stream and its own condition, computed alone.
    module = KappaFlow.load(ck)
    for i in (4, 11):
        z = latent_noise(0, [i], 2 * NPIX * NPIX)
        one = module.sample(1, cond={"Omega_m": want[i, 0], "sigma_8": want[i, 1]}, noise=z).numpy()[0]
        np.testing.assert_allclose(maps[i], one, rtol=1e-5, atol=1e-6 * np.abs(maps).max())
    # The condition matters: the same latent under another cosmology gives another map.
    other = sample_maps(module, 12, cond={"Omega_m": 0.3, "sigma_8": 0.8}, device="cpu")
    assert np.abs(other - maps).max() > 1e-3 * np.abs(maps).max()
    np.testing.assert_allclose(
        sample_maps(module, 12, cond=want, batch_size=5, device="cpu"), maps, rtol=1e-5, atol=1e-6 * np.abs(maps).max()
    )


def test_nonfinite_maps_are_redrawn_from_the_next_stream(tmp_path, ckpts, monkeypatch):
    ck = ckpts["uncond"]
    module = KappaFlow.load(ck)
    orig = KappaFlow.sample

    def flaky(self, n, cond=None, temperature=1.0, generator=None, noise=None, ema=True, batch_size=None, **kw):
        x = orig(self, n, cond=cond, temperature=temperature, noise=noise, ema=ema)
        x[noise[:, 0] > 0.5] = float("nan")  # a latent-dependent failure (~31% of draws)
        return x

    monkeypatch.setattr(KappaFlow, "sample", flaky)
    out = generate(compose("generate", *ON_CPU, ckpt=str(ck), n_maps=8, batch_size=3, out=str(tmp_path / "m.h5")))
    st = open_store(out)
    maps = st.read()  # every stored map is finite (read checks)
    expected_redraws = 0
    redrawn = []
    for i in range(8):
        k = next(k for k in range(10) if latent_noise(0, [i], NPIX * NPIX, k)[0, 0] <= 0.5)
        expected_redraws += k
        redrawn += [i] * k
        z = latent_noise(0, [i], NPIX * NPIX, k)
        np.testing.assert_allclose(
            maps[i], orig(module, 1, noise=z).numpy()[0], rtol=1e-5, atol=1e-6 * np.abs(maps).max()
        )
    assert expected_redraws > 0
    assert st.meta.extra["nonfinite_redraws"] == expected_redraws
    assert st.meta.extra["redrawn_maps"] == sorted(set(redrawn))

    def broken(self, n, **kw):
        return torch.full((n, 1, NPIX, NPIX), float("inf"))

    monkeypatch.setattr(KappaFlow, "sample", broken)
    with pytest.raises(GenerationError, match="non-finite in all 3 attempts"):
        generate(
            compose(
                "generate", *ON_CPU, ckpt=str(ck), n_maps=4, batch_size=2, max_attempts=3, out=str(tmp_path / "bad.h5")
            )
        )
    assert not (tmp_path / "bad.h5").exists()


def test_shape_noise_is_seeded_and_recorded(tmp_path, ckpts):
    ck = ckpts["cond"]
    kw = dict(ckpt=str(ck), n_maps=6, batch_size=4, cond={"Omega_m": 0.3, "sigma_8": 0.8})
    clean = open_store(generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "c.h5")))).read()
    noisy_st = open_store(
        generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "n.h5"), noise={"sigma_e": 0.26, "n_gal": 30.0}))
    )
    noise = noisy_st.read() - clean
    sigma = 0.26 / math.sqrt(30.0 * 2.0**2)  # sigma_e / sqrt(n_gal * pixel area), pixel 2 arcmin
    assert abs(noise.std() / sigma - 1) < 0.05  # 3072 pixels: 1.3 % standard error
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert noisy_st.meta.extra["noise"] == {"sigma_e": 0.26, "n_gal": 30.0, "seed": 0}
    # independent of the latents and of the batch layout, reproducible per (noise.seed, i)
    again = open_store(
        generate(
            compose(
                "generate",
                *ON_CPU,
                **{**kw, "batch_size": 5},
                out=str(tmp_path / "n2.h5"),
                noise={"sigma_e": 0.26, "n_gal": 30.0},
            )
        )
    ).read()
    np.testing.assert_allclose(again - clean, noise, atol=1e-6)
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.1


# --------------------------------------------------------------------------------------------
# FITS, several processes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["files", "cube"])
def test_fits_output_read_back_by_ingest(tmp_path, ckpts, layout):
    from lensflow.ingestion import ingest

    ck = ckpts["cond"]
    kw = dict(ckpt=str(ck), n_maps=3, batch_size=2, cond={"Omega_m": [0.25, 0.35], "sigma_8": 0.8})
    ref = open_store(generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "ref.h5"))))
    target = tmp_path / ("fits" if layout == "files" else "mocks.fits")
    generate(compose("generate", *ON_CPU, **kw, out=str(target), format="fits", fits_layout=layout))
    assert not (tmp_path / (target.name + ".parts")).exists()
    side = json.loads((tmp_path / (target.name + ".json")).read_text())
    assert side["n_maps"] == 6 and side["extra"]["checkpoint_sha256"] == ref.meta.extra["checkpoint_sha256"]
    icfg = compose("ingest", f"input={target}", f"out={tmp_path / 'back.h5'}", "kind=mock", "progress=false")
    back = open_store(ingest(icfg))
    np.testing.assert_array_equal(back.read(), ref.read())
    assert back.meta.param_names == ("Omega_m", "sigma_8")
    np.testing.assert_allclose(back.read_params(), ref.read_params(), rtol=1e-6)
    assert math.isclose(back.meta.pixel_arcmin, 2.0, rel_tol=1e-9)
    assert back.meta.source_redshifts == (0.5, 1.0)


def test_two_cpu_processes_equal_one(tmp_path, ckpts):
    ck = ckpts["cond"]
    kw = dict(ckpt=str(ck), n_maps=5, batch_size=3, cond={"Omega_m": [0.25, 0.35], "sigma_8": 0.8})
    one = open_store(generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "one.h5"))))
    two = open_store(generate(compose("generate", *ON_CPU, **kw, devices=2, out=str(tmp_path / "two.h5"))))
    np.testing.assert_allclose(two.read(), one.read(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(two.read_params(), one.read_params())
    np.testing.assert_array_equal(two.read_realization(), one.read_realization())
    assert two.meta.extra["job_sha256"] == one.meta.extra["job_sha256"]


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no output
# --------------------------------------------------------------------------------------------


def test_bad_input_one_line_exit_2_no_output(tmp_path, ckpts, monkeypatch, run_command):
    monkeypatch.chdir(tmp_path)
    uc, cc = str(ckpts["uncond"]), str(ckpts["cond"])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    cases = {
        "missing checkpoint": ([f"ckpt={tmp_path / 'nope.ckpt'}"], "checkpoint not found"),
        "no checkpoint": ([], "ckpt: no checkpoint"),
        "foreign checkpoint": ([f"ckpt={foreign}"], "not a lensflow checkpoint"),
        "map store as checkpoint": ([f"ckpt={ckpts['cond'].with_suffix('.h5')}"], "not a checkpoint (corrupt or"),
        # issue 27.10: outside the training box the emulator extrapolates; far outside the crop Gaussian failed
        "condition outside the box": (
            [f"ckpt={cc}", "cond.Omega_m=[0.3,0.5]", "cond.sigma_8=0.8"],
            "cond.Omega_m=0.5 is outside the emulator's training box [0.25, 0.35]",
        ),
        "condition far outside": ([f"ckpt={cc}", "cond.Omega_m=0.3", "cond.sigma_8=9"], "allow_extrapolation=true"),
        "n_maps=0": ([f"ckpt={uc}", "n_maps=0"], "n_maps must be an integer >= 1"),
        "n_maps<0": ([f"ckpt={uc}", "n_maps=-3"], "n_maps must be an integer >= 1"),
        "temperature=0": ([f"ckpt={uc}", "temperature=0"], "temperature must be a positive number"),
        "unknown condition": (
            [f"ckpt={cc}", "cond.Omega_m=0.3", "cond.sigma_8=0.8", "cond.w0=-1"],
            "unknown condition(s) ['w0']",
        ),
        "missing condition": ([f"ckpt={cc}", "cond.Omega_m=0.3"], "missing value(s) for ['sigma_8']"),
        "condition on unconditional": ([f"ckpt={uc}", "cond.Omega_m=0.3"], "the model is unconditional"),
        "bad format": ([f"ckpt={uc}", "format=npy"], "format must be one of"),
        "bad noise": ([f"ckpt={uc}", "noise.sigma_e=-1"], "noise.sigma_e must be"),
        "typo in a key": ([f"ckpt={uc}", "n_mpas=3"], "n_mpas"),
    }
    for name, (args, msg) in cases.items():
        code, err = run_command(gen.main, *args, "out=m.h5", "progress=false", "accelerator=cpu")
        err = err[-1] if err else ""  # the last stderr line
        assert code == 2, name
        assert err.startswith("error: ") and msg in err, (name, err)
        assert _left(tmp_path) == ["foreign.ckpt"], name  # nothing written, no work folder
    # An existing output is not replaced (nor touched) without overwrite=true.
    (tmp_path / "m.h5").write_bytes(b"keep")
    code, err = run_command(gen.main, f"ckpt={uc}", "n_maps=2", "out=m.h5", "progress=false", "accelerator=cpu")
    err = err[-1] if err else ""  # the last stderr line
    assert code == 2 and "exists; pass overwrite=true" in err
    assert (tmp_path / "m.h5").read_bytes() == b"keep" and _left(tmp_path) == ["foreign.ckpt", "m.h5"]
    code, err = run_command(
        gen.main, f"ckpt={uc}", "n_maps=2", "out=m.h5", "overwrite=true", "progress=false", "accelerator=cpu"
    )
    err = err[-1] if err else ""  # the last stderr line
    assert code == 0 and open_store(tmp_path / "m.h5").n == 2
    assert _left(tmp_path) == ["foreign.ckpt", "m.h5"]
    # The CLI's maps are the API's maps.
    np.testing.assert_allclose(open_store(tmp_path / "m.h5").read(), sample_maps(uc, 2, device="cpu"), rtol=1e-5)


def test_api_bad_input():
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        sample_maps("x.ckpt", 0)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        sample_maps("x.ckpt", 1, temperature=-1.0)
    with pytest.raises(ValueError, match="checkpoint not found"):
        sample_maps("definitely/missing.ckpt", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, ckpts):
    ck = ckpts["cond"]
    kw = dict(ckpt=str(ck), n_maps=6, batch_size=4, cond={"Omega_m": [0.25, 0.35], "sigma_8": 0.8})
    cpu = open_store(generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "cpu.h5")))).read()
    st = open_store(
        generate(compose("generate", *ON_CPU, **kw, accelerator="cuda", devices="auto", out=str(tmp_path / "gpu.h5")))
    )
    # the same latents per map; only kernels differ (TF32 convolutions allowed by default on recent GPUs)
    np.testing.assert_allclose(st.read(), cpu, rtol=0, atol=2e-3 * np.abs(cpu).max())
    assert st.meta.extra["job_sha256"] == open_store(tmp_path / "cpu.h5").meta.extra["job_sha256"]


def test_bench_suite_rows(ckpts):
    """The benchmark runs end to end (nothing is timed here): one model, CPU, tiny measurement windows."""
    from lensflow.bench.generate import run

    rows = run(
        {"ckpt": str(ckpts["uncond"]), "devices": ["cpu"], "batch_size": {"cpu": 2}, "min_seconds": 0.01, "repeats": 1}
    )
    assert [r["baseline"] for r in rows] == ["one map per call", "batched sample, no streams/I/O"]
    for r in rows:
        assert r["unit"] == "maps/s" and r["value"] > 0 and r["baseline_value"] > 0
        assert math.isclose(r["ratio"], r["value"] / r["baseline_value"])
        assert r["maps"] == f"1x{NPIX}x{NPIX}" and r["device"] == "cpu"


# --------------------------------------------------------------------------------------------
# The notebook API: lensflow.load, and notebooks/emulator.ipynb
# --------------------------------------------------------------------------------------------


def test_emulator_samples_the_generated_maps_and_evaluates_their_density(tmp_path, ckpts):
    emu = lensflow.load(ckpts["uncond"], device="cpu")
    assert emu.param_names == () and emu.map_shape == (1, NPIX, NPIX)
    assert emu.meta == StoreMeta(2.0, (0.5,), periodic=True)  # the training store's metadata
    maps = emu.sample(5, seed=2)
    assert maps.dtype == np.float32 and maps.shape == (5, 1, NPIX, NPIX)
    out = generate(
        compose("generate", *ON_CPU, ckpt=str(ckpts["uncond"]), n_maps=5, seed=2, out=str(tmp_path / "m.h5"))
    )
    np.testing.assert_array_equal(maps, open_store(out).read())  # the same maps as generate
    lp = emu.log_prob(maps)
    assert lp.dtype == np.float64 and lp.shape == (5,) and np.isfinite(lp).all()
    direct = KappaFlow.load(ckpts["uncond"]).log_prob(torch.from_numpy(maps)).double().numpy()
    np.testing.assert_allclose(lp, direct, rtol=1e-6)
    assert emu.log_prob(maps[1])[0] == pytest.approx(lp[1], rel=1e-6)  # one map [C, H, W]
    np.testing.assert_allclose(emu.log_prob(maps, batch_size=2), lp, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        emu.log_prob(maps[:, :, :8])


def test_emulator_takes_conditions_as_a_dict_or_an_array(ckpts):
    emu = lensflow.load(ckpts["cond"], device="cpu")
    assert emu.param_names == ("Omega_m", "sigma_8")
    rows = np.array([[0.25, 0.75], [0.35, 0.85], [0.3, 0.8]])
    a = emu.sample(3, cond={"Omega_m": rows[:, 0], "sigma_8": rows[:, 1]}, seed=1)
    b = emu.sample(3, cond=rows, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, sample_maps(ckpts["cond"], 3, cond=rows, seed=1, device="cpu"))
    np.testing.assert_array_equal(
        emu.log_prob(b, cond=rows), emu.log_prob(b, cond={"Omega_m": rows[:, 0], "sigma_8": rows[:, 1]})
    )
    one = emu.sample(2, cond={"Omega_m": 0.3, "sigma_8": 0.8})  # scalars broadcast to every map
    np.testing.assert_array_equal(one, emu.sample(2, cond=[0.3, 0.8]))
    with pytest.raises(ValueError, match="missing"):
        emu.sample(2, cond={"Omega_m": 0.3})
    with pytest.raises(ValueError, match="conditioned"):
        emu.log_prob(b)


def test_import_lensflow_stays_light():
    heavy = ("torch", "lightning", "numpy", "hydra")
    code = f"import sys, lensflow; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_emulator_notebook_runs_on_a_tiny_checkpoint(tmp_path, ckpts):
    papermill = pytest.importorskip("papermill")
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "emulator.ipynb"
    params = {
        "ckpt": str(ckpts["cond"]),
        "simulations": str(ckpts["cond"].with_suffix(".h5")),
        "split": "all",
        "n_maps": 8,
        "device": "cpu",
    }
    papermill.execute_notebook(
        str(nb),
        str(tmp_path / "out.ipynb"),
        parameters=params,
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
    )
    done = json.loads((tmp_path / "out.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in done["cells"] for o in c.get("outputs", []))
    assert "Emulator(2x16x16 maps" in text and "bits/dim" in text and "C_ell: mean |fractional error|" in text


# --------------------------------------------------------------------------------------------
# Output files respect the umask
# --------------------------------------------------------------------------------------------


def test_outputs_are_readable_by_the_group_under_umask_022(tmp_path, ckpts, monkeypatch):
    ck = str(ckpts["cond"])
    kw = dict(ckpt=ck, n_maps=2, batch_size=1, cond={"Omega_m": 0.3, "sigma_8": 0.8})
    old = os.umask(0o022)
    try:
        h5 = generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "m.h5")))
        fits = generate(
            compose("generate", *ON_CPU, **kw, out=str(tmp_path / "mocks.fits"), format="fits", fits_layout="cube")
        )
        write_part = job.write_part

        def crash_after_first(plan, b, *args):
            write_part(plan, b, *args)
            raise RuntimeError("stop")

        monkeypatch.setattr(job, "write_part", crash_after_first)
        with pytest.raises(RuntimeError, match="stop"):
            generate(compose("generate", *ON_CPU, **kw, out=str(tmp_path / "stopped.h5")))
    finally:
        os.umask(old)
    parts = tmp_path / "stopped.h5.parts"
    for path in (h5, fits, tmp_path / "mocks.fits.json", parts / "job.json", parts / "part-000000000.h5"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_partial_config_from_python_is_the_composed_one(tmp_path):
    """The command line and a Python caller get the same request: the YAML holds no default of its own."""
    (tmp_path / "x.ckpt").write_bytes(b"")
    from lensflow.generation import GenerationRequest

    composed = GenerationRequest.from_config(
        compose("generate", *ON_CPU, ckpt=str(tmp_path / "x.ckpt"), progress=True, accelerator="auto", devices="auto")
    )
    assert composed == GenerationRequest.from_config({"ckpt": str(tmp_path / "x.ckpt"), "noise": {"n_gal": 30.0}})
    assert composed.out == Path("mocks.h5").absolute() and composed.noise is None


def test_the_checkpoint_is_read_once_per_job(tmp_path, ckpts, monkeypatch):
    import lensflow.checkpoint as checkpoint

    calls = []
    load = checkpoint.torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: calls.append(a) or load(*a, **k))
    generate(
        compose("generate", *ON_CPU, ckpt=str(ckpts["uncond"]), n_maps=5, batch_size=2, out=str(tmp_path / "m.h5"))
    )
    assert len(calls) == 1  # loaded (and hashed, from the same bytes) once for all three batches


def test_extrapolation_is_refused_unless_asked_for_and_then_recorded(tmp_path, ckpts):
    """Issue 27.10: a θ outside the training box is refused in one line (parameter, value, box) before any file is
    made; ``allow_extrapolation`` draws there and the output's metadata says so."""
    ck = ckpts["cond"]
    emu = lensflow.load(ck, device="cpu")
    assert emu.training_box.as_dict() == {"Omega_m": (0.25, 0.35), "sigma_8": (0.75, 0.85)}
    with pytest.raises(ValueError, match=r"cond.sigma_8=0.9 is outside the emulator's training box \[0.75, 0.85\]"):
        emu.sample(2, cond={"Omega_m": 0.3, "sigma_8": 0.9})
    with pytest.raises(ValueError, match="outside the emulator's training box"):
        emu.model.sample(2, cond=[0.3, 0.9])
    edge = emu.sample(1, cond={"Omega_m": 0.35, "sigma_8": 0.85})  # the box's corner is inside (float32 /params)
    assert np.isfinite(edge).all()
    maps = emu.sample(2, cond={"Omega_m": 0.3, "sigma_8": 0.9}, allow_extrapolation=True)
    cfg = dict(ckpt=str(ck), n_maps=2, out=str(tmp_path / "x.h5"), cond={"Omega_m": 0.3, "sigma_8": 0.9})
    with pytest.raises(ValueError, match="allow_extrapolation=true"):
        generate(compose("generate", *ON_CPU, **cfg))
    assert _left(tmp_path) == []  # no output, no <out>.parts/
    out = generate(compose("generate", *ON_CPU, **cfg, allow_extrapolation=True))
    st = open_store(out)
    np.testing.assert_array_equal(st.read(), maps)
    assert st.meta.extra["allow_extrapolation"] is True and st.meta.created_by["config"]["allow_extrapolation"]
