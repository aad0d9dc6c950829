"""The end-to-end runner ``python -m lensflow.run_experiment`` (:mod:`lensflow.workflow`) on a tiny experiment:
every stage runs once, a second run skips them all, a changed generate override re-runs only what depends on it,
and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.config import TINY_PIPELINE as TINY

import lensflow.run_experiment
from lensflow.mapstore import open_store


def _runner():
    return lensflow.run_experiment


def _records(run_dir: Path) -> dict[str, dict]:
    return {
        s: json.loads((run_dir / s / "stage.json").read_text())
        for s in ("simulate", "train", "generate", "validate", "report")
    }


def test_pipeline_runs_skips_and_reruns_what_changed(tmp_path, capsys):
    run = _runner()
    run_dir = tmp_path / "run"
    args = [*TINY, f"paths.root={tmp_path}", "--run-dir", str(run_dir), "--in-process"]
    code = run.main(args)
    first = _records(run_dir)
    val = first["validate"]["outputs"]
    assert code == (0 if val["pass"] else 1)
    summary = json.loads((Path(val["results"][0]["out"]) / "summary.json").read_text())
    assert summary["pass"] == val["pass"]
    # chained stages: mocks from the trained checkpoint, validated against the simulated store's test split
    store = first["simulate"]["outputs"]["store"]
    ckpt = Path(first["train"]["outputs"]["checkpoint"])
    mocks = open_store(first["generate"]["outputs"]["mocks"])
    assert mocks.meta.kind == "mock" and mocks.meta.extra["checkpoint"] == str(ckpt)
    assert mocks.n == open_store(store).indices("test").size  # as many mocks as reference test maps
    assert summary["inputs"]["reference"]["path"].endswith(Path(store).name)
    assert (run_dir / "report" / "index.html").exists() and "lensflow pipeline" in (
        run_dir / "report" / "report.md"
    ).read_text()
    ckpt_mtime = ckpt.stat().st_mtime_ns

    # Same config: every stage is skipped and nothing is rewritten.
    capsys.readouterr()
    assert run.main(args) == code
    out = capsys.readouterr().out
    assert out.count("skip (up to date)") == 5
    assert _records(run_dir) == first and ckpt.stat().st_mtime_ns == ckpt_mtime

    # A generate override re-runs generate, validate and report only.
    assert run.main([*args, "generate.n_maps=4", "generate.seed=1"]) in (0, 1)
    out = capsys.readouterr().out
    for stage, verb in (
        ("simulate", "skip"),
        ("train", "skip"),
        ("generate", "run "),
        ("validate", "run "),
        ("report", "run "),
    ):
        assert f"[pipeline] {stage:<9} {verb}" in out, (stage, out)
    again = _records(run_dir)
    assert again["train"] == first["train"] and again["generate"]["hash"] != first["generate"]["hash"]
    assert open_store(again["generate"]["outputs"]["mocks"]).n == 4
    assert ckpt.stat().st_mtime_ns == ckpt_mtime


def test_pipeline_bad_input_is_one_line(tmp_path, capsys):
    run = _runner()
    assert run.main(["+experiment=kappa_quick", "--stages", "simulate,bogus", f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --stages: unknown stage(s) ['bogus']")
    assert run.main(["+experiment=no_such_experiment", f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train config:") and "no_such_experiment" in err[0]
    assert run.main(["+experiment=kappa_quick", "generate.n_mpas=3", f"paths.root={tmp_path}"]) == 2
    assert "n_mpas" in capsys.readouterr().err
    # A dry run says what would run and creates nothing.
    assert run.main([*TINY, f"paths.root={tmp_path}", "--run-dir", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[pipeline] simulate  run  (not done)" in out
    assert "[pipeline] report    run  (after simulate)" in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "data").exists()
