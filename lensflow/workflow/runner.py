"""The five stages of the end-to-end pipeline (simulate → train → generate → validate → report) and the
runner that skips the ones that are up to date.

The train stage runs ``python -m lensflow.train`` as a child process (so DDP over several GPUs works
as from the command line; ``--in-process`` calls :func:`lensflow.train.train` here instead); the other
stages run in this process. Progress lines go to ``say`` (the command prints them on stdout).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.atomic import write_text
from lensflow._util.hashing import sha256_file
from lensflow._util.plain import to_plain
from lensflow.report.html import pipeline_page
from lensflow.report.text import pipeline_line, pipeline_stage_line
from lensflow.workflow.options import PipelineRequest, given
from lensflow.workflow.stages import STAGES, PipelineError, Stage, stage_hash, write_records

__all__ = ["Pipeline", "run_pipeline"]

#: What each stage's fingerprint depends on.
DEPENDS = {
    "simulate": (),
    "train": ("simulate",),
    "generate": ("train", "simulate"),
    "validate": ("generate", "simulate"),
    "report": ("simulate", "train", "generate", "validate"),
}
# A stage's work: (stage, pending record or None) -> (config, outputs, fingerprint, paths that must exist)
Work = Callable[[Stage, Any], tuple[Any, dict[str, Any], str, list[Any]]]


def _editable(cfg: Any) -> Any:
    """A copy of a composed config that accepts new keys."""
    from omegaconf import OmegaConf

    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    return out


class Pipeline:
    """One pipeline folder and its stages; :meth:`run` runs what is not up to date."""

    def __init__(self, opts: PipelineRequest, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.say = say
        self.run_dir = opts.run_dir
        self.stages = {s: Stage(self.run_dir, s) for s in STAGES}
        self.records: dict[str, dict[str, Any]] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def _inputs(self, *names: str) -> dict[str, str]:
        out = {}
        for n in names:
            rec = self.records.get(n) or self.stages[n].record()
            if rec is None:
                raise PipelineError(f"stage {n!r} has not run in {self.run_dir}; run it first")
            self.records[n] = rec
            out[n] = rec["fingerprint"]
        return out

    def _step(self, name: str, key: str, work: Work) -> dict[str, Any]:
        stage = self.stages[name]
        todo, why = stage.status(key, name in self.opts.force)
        if name not in self.opts.stages:
            rec = stage.record()
            if rec is None or rec.get("hash") != key:
                raise PipelineError(f"stage {name!r} is not selected (--stages) but not up to date ({why})")
            todo, why = False, "not selected; up to date"
        self.say(pipeline_stage_line(name, todo, why))
        if not todo:
            rec = stage.record()
            assert rec is not None
        elif self.opts.dry_run:
            rec = {"fingerprint": f"dry-run:{key}", "outputs": {}}
        else:
            t0 = time.time()
            pend = stage.pending()
            stage.begin(key)
            config, outputs, fingerprint, exist = work(stage, pend if pend and pend.get("hash") == key else None)
            inputs = {d: self.records[d]["fingerprint"] for d in DEPENDS[name]}
            rec = stage.finish(key, config, inputs, outputs, fingerprint, exist, time.time() - t0)
        self.records[name] = rec
        return rec

    # -- stages -----------------------------------------------------------------------------------
    def simulate(self) -> dict[str, Any]:
        data = self.opts.train_cfg.data
        if data.get("path"):
            store = Path(str(data.path)).expanduser().resolve()
            if not store.exists():
                raise PipelineError(f"data.path: {store}: map store not found")
            st = store.stat()
            config = {"path": str(store), "size": st.st_size, "mtime": st.st_mtime}
        else:
            from lensflow.simulation import resolve_spec

            config = {"spec": resolve_spec(to_plain(data.simulate))}
        key = stage_hash(config)

        def work(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            if "path" in config:
                path = Path(config["path"])
            else:
                from lensflow.simulation import ensure_simulated

                cache = Path(str(self.opts.train_cfg.paths.data_dir)).expanduser().resolve()
                path = Path(ensure_simulated(to_plain(data.simulate), cache)).resolve()
            return config, {"store": str(path)}, key, [path]

        return self._step("simulate", key, work)

    def train(self, store: str) -> dict[str, Any]:
        cfg = _editable(self.opts.train_cfg)
        cfg.data.path = store
        cfg.ckpt_path = None
        config = to_plain(cfg)
        config.pop("paths", None)  # where things go does not change the model
        key = stage_hash({"config": config, "inputs": self._inputs("simulate")})
        run_dir = self.stages["train"].dir

        def work(stage: Stage, pending: Any) -> tuple[Any, dict, str, list]:
            last = run_dir / "checkpoints" / "last.ckpt"
            resume = pending is not None and last.exists()  # an unfinished run of this very config
            if resume:
                self.say(pipeline_line(f"train     resuming from {last}"))
            elif (run_dir / "checkpoints").exists():
                shutil.rmtree(run_dir / "checkpoints")  # another config's checkpoints must not be mixed in
            returncode = self._train(store, run_dir, last if resume else None)
            if returncode != 0:
                raise PipelineError(
                    f"train stage failed (exit {returncode}); fix the cause and re-run: "
                    "an unfinished run resumes from its last.ckpt"
                )
            best = run_dir / "checkpoints" / "best.ckpt"
            ckpt = best if best.exists() else last
            if not ckpt.exists():
                raise PipelineError(f"train stage wrote no checkpoint under {run_dir / 'checkpoints'}")
            outputs = {"checkpoint": str(ckpt), "summary": str(run_dir / "summary.json"), "run_dir": str(run_dir)}
            return config, outputs, sha256_file(ckpt), [ckpt]

        return self._step("train", key, work)

    def _train(self, store: str, run_dir: Path, resume: Path | None) -> int:
        """Train into ``run_dir`` (a child ``python -m lensflow.train``, or here with ``--in-process``)."""
        if self.opts.in_process:
            from lensflow.train import train

            tcfg = _editable(self.opts.train_cfg)
            tcfg.data.path, tcfg.paths.run_dir = store, str(run_dir)
            tcfg.ckpt_path = None if resume is None else str(resume)
            train(tcfg)
            return 0
        args = [
            *self.opts.train_args,
            f"data.path={store}",
            f"paths.run_dir={run_dir}",
            f"hydra.run.dir={run_dir}",
            *([f"ckpt_path={resume}"] if resume is not None else []),
        ]
        return subprocess.run([sys.executable, "-m", "lensflow.train", *args]).returncode

    def generate(self, ckpt: str, store: str) -> dict[str, Any]:
        from lensflow.mapstore import open_store

        cfg = _editable(self.opts.gen_cfg)
        out = self.stages["generate"].dir / "mocks.h5"
        cfg.ckpt, cfg.out, cfg.format, cfg.overwrite = ckpt, str(out), "hdf5", True
        names = [str(n) for n in (self.opts.train_cfg.data.get("cond") or [])]
        with open_store(store) as st:
            idx = st.indices(str(self.opts.val_cfg.reference_split))
            params = st.read_params(idx) if names else np.zeros((len(idx), 0))
            cols = [list(st.meta.param_names).index(n) for n in names]
        if names and not given(self.opts.gen_args, "cond"):
            # the parameter sets of the reference split, n_maps per set (a grid: the product of the values)
            cfg.cond = {n: sorted({float(v) for v in params[:, c]}) for n, c in zip(names, cols, strict=True)}
        if not given(self.opts.gen_args, "n_maps"):
            if names:
                _, counts = np.unique(params[:, cols], axis=0, return_counts=True)
                cfg.n_maps = int(np.max(counts)) if counts.size else 1
            else:
                cfg.n_maps = max(1, len(idx))
        config = to_plain(cfg)
        for k in ("progress", "devices", "accelerator", "overwrite"):
            config.pop(k, None)  # how, not what
        key = stage_hash({"config": config, "inputs": self._inputs("train", "simulate")})

        def work(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            from lensflow.generate import generate

            path = generate(cfg)
            with open_store(path) as st:
                fp = f"{st.meta.extra.get('job_sha256')}:{st.n}"
                n = st.n
            return config, {"mocks": str(path), "n_maps": n}, fp, [path]

        return self._step("generate", key, work)

    def _selections(self, base: Any, store: str, mocks: str) -> list[dict[str, float]]:
        """One parameter selection per generated parameter set with reference maps (conditional models)."""
        from lensflow.mapstore import open_store

        names = [str(n) for n in (self.opts.train_cfg.data.get("cond") or [])]
        if not names or base.select:
            return [dict(to_plain(base.select) or {})]
        with open_store(store) as ref, open_store(mocks) as cand:
            r = ref.read_params(ref.indices(str(base.reference_split)))
            c = cand.read_params()
            rc = [list(ref.meta.param_names).index(n) for n in names]
            cc = [list(cand.meta.param_names).index(n) for n in names]
            ref_sets = np.unique(r[:, rc], axis=0)
            cand_sets = np.unique(c[:, cc], axis=0)
        both = [row for row in cand_sets if np.any(np.all(np.isclose(ref_sets, row, rtol=1e-6), axis=1))]
        if not both:
            raise PipelineError(
                f"validate: no generated parameter set has reference maps in the {base.reference_split} split"
            )
        return [{n: float(v) for n, v in zip(names, row, strict=True)} for row in both]

    def validate(self, mocks: str, store: str) -> dict[str, Any]:
        base = _editable(self.opts.val_cfg)
        base.reference, base.candidate, base.overwrite = store, mocks, True
        selections = self._selections(base, store, mocks)
        config = to_plain(base)
        config.pop("progress", None)
        config["selections"] = selections
        key = stage_hash({"config": config, "inputs": self._inputs("generate", "simulate")})
        folder = self.stages["validate"].dir

        def work(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            from lensflow.validation import validate

            results = []
            for sel in selections:
                label = ",".join(f"{k}={v:g}" for k, v in sel.items()) or "all"
                c = base.copy()
                c.select = sel
                c.out = str(folder / label)
                s = validate(c)
                results.append(
                    {
                        "select": sel,
                        "label": label,
                        "pass": bool(s["pass"]),
                        "failures": list(s["failures"]),
                        "warnings": list(s.get("warnings", [])),
                        "out": str(folder / label),
                        "verdicts": s["verdicts"],
                    }
                )
            outputs = {"pass": all(r["pass"] for r in results), "results": results}
            exist = [Path(r["out"]) / "summary.json" for r in results]
            return config, outputs, stage_hash(outputs), exist

        return self._step("validate", key, work)

    def report(self) -> dict[str, Any]:
        key = stage_hash({"inputs": self._inputs("simulate", "train", "generate", "validate")})

        def work(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            try:
                train_summary = json.loads(Path(self.records["train"]["outputs"]["summary"]).read_text())
            except (OSError, KeyError, json.JSONDecodeError):
                train_summary = {}
            name = str(self.opts.train_cfg.name)
            page, md = pipeline_page(name, self.run_dir, self.records, STAGES[:-1], train_summary, stage.dir)
            write_text(stage.dir / "index.html", page)
            write_text(stage.dir / "report.md", md)
            write_records(stage.dir / "pipeline.json", {"run_dir": str(self.run_dir), "stages": self.records})
            outputs = {"html": str(stage.dir / "index.html"), "markdown": str(stage.dir / "report.md")}
            return {}, outputs, key, [stage.dir / "index.html"]

        return self._step("report", key, work)

    # -- all --------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the stages in order; 0 when every validation passes, 1 when one fails (0 for a dry run)."""
        self.say(pipeline_line(f"{self.opts.train_cfg.name} in {self.run_dir}"))

        def out(stage: str, key: str) -> str:
            return self.records[stage]["outputs"][key]

        steps = [
            ("simulate", lambda: self.simulate()),
            ("train", lambda: self.train(out("simulate", "store"))),
            ("generate", lambda: self.generate(out("train", "checkpoint"), out("simulate", "store"))),
            ("validate", lambda: self.validate(out("generate", "mocks"), out("simulate", "store"))),
            ("report", lambda: self.report()),
        ]
        for i, (name, step) in enumerate(steps):
            rec = step()
            if self.opts.dry_run and str(rec["fingerprint"]).startswith("dry-run:"):
                for later, _ in steps[i + 1 :]:
                    self.say(pipeline_stage_line(later, True, f"after {name}"))
                return 0
        if self.opts.dry_run:
            return 0
        passed = bool(self.records["validate"]["outputs"]["pass"])
        self.say(pipeline_line(f"{'PASS' if passed else 'FAIL'}: report {self.records['report']['outputs']['html']}"))
        return 0 if passed else 1


def run_pipeline(argv: Sequence[str], say: Callable[[str], None]) -> int:
    """Parse ``argv`` (see :mod:`lensflow.workflow.options`), run the pipeline, return the exit code."""
    return Pipeline(PipelineRequest.from_config(argv), say).run()
