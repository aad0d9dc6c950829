#!/usr/bin/env python
"""End-to-end lensflow pipeline for one experiment: simulate -> train -> generate -> validate -> report.

::

    python pipelines/run.py +experiment=kappa_quick
    python pipelines/run.py +experiment=kappa generate.n_maps=5000 validate.max_maps=2000
    python pipelines/run.py +experiment=kappa_quick --force train          # retrain (later stages follow)
    python pipelines/run.py +experiment=kappa_quick --dry-run              # say what would run, run nothing

Arguments:
    ``generate.KEY=VALUE``   override of ``conf/generate.yaml`` for the generate stage (``generate.cond.*``
                             for conditions; by default the mocks match the reference test split: as
                             many maps, and for a conditional model its parameter sets);
    ``validate.KEY=VALUE``   override of ``conf/validate.yaml`` for the validate stage;
    any other ``KEY=VALUE``  override of the training config ``conf/train.yaml`` (``+experiment=NAME``,
                             ``data.simulate.*`` for the simulation, ``trainer.*``, ``model.*``, ...);
    ``--run-dir DIR``        the pipeline folder (default ``${paths.output_dir}/pipeline/<name>``);
    ``--stages a,b``         run only these stages (the others must be done already);
    ``--force a,b``          run these stages even when up to date;
    ``--dry-run``            print the plan and stop;
    ``--in-process``         run the train stage in this process too (one device: notebooks, tests).

Each stage writes into ``<run-dir>/<stage>/`` and, when it succeeds, a record ``stage.json`` with the
SHA-256 of its resolved config together with the fingerprints of its inputs (the simulation spec, the
checkpoint's sha256, the mocks' job hash, ...). A stage is skipped when its record matches and its outputs
exist, so an interrupted pipeline picks up where it stopped: the simulation is cached by spec, training
resumes from ``last.ckpt`` of an unfinished run of the same config, and generation resumes its batches.

The train stage runs ``python -m lensflow.train`` as a child process (so DDP over several GPUs works as
it does from the command line; ``--in-process`` calls :func:`lensflow.train.train` here instead); the
other stages run in this process.

Exit code: 0 when every validation passes, 1 when one fails (gate deployments on it), 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGES: tuple[str, ...] = ("simulate", "train", "generate", "validate", "report")
RECORD = "stage.json"
PENDING = "stage.pending.json"


class PipelineError(ValueError):
    """Bad input or an inconsistent pipeline folder (one line)."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _compose(name: str, overrides: Sequence[str]) -> Any:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lensflow.conf", version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - a composition error is a bad command line
        hint = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
        raise PipelineError(f"{name} config: {' '.join(str(e).replace(hint, '').split())}") from None
    finally:
        GlobalHydra.instance().clear()


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def split_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str], list[str]]:
    """Runner options, and the overrides of the train, generate and validate configs."""
    p = argparse.ArgumentParser(prog="pipelines/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--force", default="")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--in-process", action="store_true")
    opts, rest = p.parse_known_args(list(argv))
    train, gen, val = [], [], []
    for a in rest:
        if a.startswith("-"):
            raise PipelineError(f"unknown option {a}")
        if "=" not in a and not a.startswith("~"):
            raise PipelineError(f"argument {a!r} is not KEY=VALUE")
        if a.startswith("generate."):
            key = a[len("generate.") :]
            gen.append(f"++{key}" if key.startswith("cond.") else key)
        elif a.startswith("validate."):
            key = a[len("validate.") :]
            val.append(f"++{key}" if key.startswith("select.") else key)
        else:
            train.append(a)
    for name in ("stages", "force"):
        bad = [s for s in _stage_list(getattr(opts, name)) if s not in STAGES]
        if bad:
            raise PipelineError(f"--{name}: unknown stage(s) {bad}; stages are {list(STAGES)}")
    return opts, train, gen, val


def _stage_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _given(overrides: Sequence[str], key: str) -> bool:
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == key or k.startswith(key + ".") for k in keys)


# --------------------------------------------------------------------------------------------
# Stage records
# --------------------------------------------------------------------------------------------


class Stage:
    """One stage folder: its record, the check whether it is up to date, and its atomic completion."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.dir = run_dir / name

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def status(self, key: str, force: bool) -> tuple[bool, str]:
        """(run?, why) for a stage whose config and inputs hash to ``key``."""
        rec = self.record()
        if force:
            return True, "forced"
        if rec is None:
            return True, "not done"
        if rec.get("hash") != key:
            return True, "config or inputs changed"
        missing = [p for p in rec.get("outputs_exist", []) if not Path(p).exists()]
        if missing:
            return True, f"output missing ({missing[0]})"
        return False, "up to date"

    def begin(self, key: str) -> None:
        (self.dir / RECORD).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / PENDING, {"hash": key, "started": time.time()})

    def pending(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / PENDING).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def finish(
        self,
        key: str,
        config: Any,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        fingerprint: str,
        exist: Sequence[str | Path],
        seconds: float,
    ) -> dict[str, Any]:
        import lensflow

        rec = {
            "stage": self.name,
            "hash": key,
            "fingerprint": fingerprint,
            "config": config,
            "inputs": dict(inputs),
            "outputs": dict(outputs),
            "outputs_exist": [str(p) for p in exist],
            "seconds": round(seconds, 2),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lensflow_version": lensflow.__version__,
        }
        _write_json(self.dir / RECORD, rec)
        (self.dir / PENDING).unlink(missing_ok=True)
        return rec


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, argv: Sequence[str]) -> None:
        self.opts, self.train_args, self.gen_args, self.val_args = split_args(argv)
        self.train_cfg = _compose("train", self.train_args)
        self.gen_cfg = _compose("generate", self.gen_args)
        self.val_cfg = _compose("validate", self.val_args)
        name = str(self.train_cfg.name)
        default = Path(str(self.train_cfg.paths.output_dir)) / "pipeline" / name
        self.run_dir = Path(self.opts.run_dir or default).expanduser().resolve()
        self.stages = {s: Stage(self.run_dir, s) for s in STAGES}
        self.selected = _stage_list(self.opts.stages)
        self.forced = set(_stage_list(self.opts.force))
        self.records: dict[str, dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []

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

    def _step(self, name: str, key: str, run: Any) -> dict[str, Any]:
        stage = self.stages[name]
        todo, why = stage.status(key, name in self.forced)
        if name not in self.selected:
            rec = stage.record()
            if rec is None or rec.get("hash") != key:
                raise PipelineError(f"stage {name!r} is not selected (--stages) but not up to date ({why})")
            todo, why = False, "not selected; up to date"
        print(f"[pipeline] {name:<9} {'run ' if todo else 'skip'} ({why})", flush=True)
        self.log.append({"stage": name, "ran": todo and not self.opts.dry_run, "why": why, "hash": key})
        if not todo:
            rec = stage.record()
            assert rec is not None
            self.records[name] = rec
            return rec
        if self.opts.dry_run:
            rec = {"fingerprint": f"dry-run:{key}", "outputs": {}}
            self.records[name] = rec
            return rec
        t0 = time.time()
        pend = stage.pending()
        stage.begin(key)
        config, outputs, fingerprint, exist = run(stage, pend if pend and pend.get("hash") == key else None)
        rec = stage.finish(key, config, self._inputs_for(name), outputs, fingerprint, exist, time.time() - t0)
        self.records[name] = rec
        self.log[-1]["seconds"] = rec["seconds"]
        return rec

    def _inputs_for(self, name: str) -> dict[str, str]:
        deps = {
            "simulate": (),
            "train": ("simulate",),
            "generate": ("train", "simulate"),
            "validate": ("generate", "simulate"),
            "report": ("simulate", "train", "generate", "validate"),
        }
        return {d: self.records[d]["fingerprint"] for d in deps[name]}

    # -- stages -----------------------------------------------------------------------------------
    def simulate(self) -> dict[str, Any]:
        data = self.train_cfg.data
        if data.get("path"):
            store = Path(str(data.path)).expanduser().resolve()
            if not store.exists():
                raise PipelineError(f"data.path: {store}: map store not found")
            st = store.stat()
            config = {"path": str(store), "size": st.st_size, "mtime": st.st_mtime}
        else:
            from lensflow.simulate import resolve_spec

            config = {"spec": resolve_spec(_plain(data.simulate))}
        key = _hash(config)

        def run(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            if "path" in config:
                path = Path(config["path"])
            else:
                from lensflow.simulate import ensure_simulated

                cache = Path(str(self.train_cfg.paths.data_dir)).expanduser().resolve()
                path = Path(ensure_simulated(_plain(data.simulate), cache)).resolve()
            return config, {"store": str(path)}, key, [path]

        return self._step("simulate", key, run)

    def train(self, store: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        cfg = self.train_cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.data.path = store
        cfg.ckpt_path = None
        config = _plain(cfg)
        config.pop("paths", None)  # where things go does not change the model
        key = _hash({"config": config, "inputs": self._inputs("simulate")})
        run_dir = self.stages["train"].dir

        def run(stage: Stage, pending: Any) -> tuple[Any, dict, str, list]:
            last = run_dir / "checkpoints" / "last.ckpt"
            resume = pending is not None and last.exists()  # an unfinished run of this very config
            if resume:
                print(f"[pipeline] train     resuming from {last}", flush=True)
            elif (run_dir / "checkpoints").exists():
                shutil.rmtree(run_dir / "checkpoints")  # another config's checkpoints must not be mixed in
            if self.opts.in_process:
                from lensflow.train import train

                tcfg = self.train_cfg.copy()
                OmegaConf.set_struct(tcfg, False)
                tcfg.data.path, tcfg.paths.run_dir = store, str(run_dir)
                tcfg.ckpt_path = str(last) if resume else None
                train(tcfg)
                returncode = 0
            else:
                args = [
                    *self.train_args,
                    f"data.path={store}",
                    f"paths.run_dir={run_dir}",
                    f"hydra.run.dir={run_dir}",
                    *([f"ckpt_path={last}"] if resume else []),
                ]
                returncode = subprocess.run([sys.executable, "-m", "lensflow.train", *args]).returncode
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
            return config, outputs, _sha256_file(ckpt), [ckpt]

        return self._step("train", key, run)

    def generate(self, ckpt: str, store: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from lensflow.mapstore import open_store

        cfg = self.gen_cfg.copy()
        OmegaConf.set_struct(cfg, False)
        out = self.stages["generate"].dir / "mocks.h5"
        cfg.ckpt, cfg.out, cfg.format, cfg.overwrite = ckpt, str(out), "hdf5", True
        names = [str(n) for n in (self.train_cfg.data.get("cond") or [])]
        with open_store(store) as st:
            idx = st.indices(str(self.val_cfg.reference_split))
            params = st.read_params(idx) if names else np.zeros((len(idx), 0))
            cols = [list(st.meta.param_names).index(n) for n in names]
        if names and not _given(self.gen_args, "cond"):
            # the parameter sets of the reference split, n_maps per set (a grid: the product of the values)
            cfg.cond = {n: sorted({float(v) for v in params[:, c]}) for n, c in zip(names, cols, strict=True)}
        if not _given(self.gen_args, "n_maps"):
            if names:
                _, counts = np.unique(params[:, cols], axis=0, return_counts=True)
                cfg.n_maps = int(np.max(counts)) if counts.size else 1
            else:
                cfg.n_maps = max(1, len(idx))
        config = _plain(cfg)
        for k in ("progress", "devices", "accelerator", "overwrite"):
            config.pop(k, None)  # how, not what
        key = _hash({"config": config, "inputs": self._inputs("train", "simulate")})

        def run(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            from lensflow.generate import generate

            path = generate(cfg)
            with open_store(path) as st:
                fp = f"{st.meta.extra.get('job_sha256')}:{st.n}"
                n = st.n
            return config, {"mocks": str(path), "n_maps": n}, fp, [path]

        return self._step("generate", key, run)

    def validate(self, mocks: str, store: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from lensflow.mapstore import open_store

        base = self.val_cfg.copy()
        OmegaConf.set_struct(base, False)
        base.reference, base.candidate, base.overwrite = store, mocks, True
        names = [str(n) for n in (self.train_cfg.data.get("cond") or [])]
        selections: list[dict[str, float]] = [dict(_plain(base.select) or {})]
        if names and not base.select:
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
            selections = [{n: float(v) for n, v in zip(names, row, strict=True)} for row in both]
        config = _plain(base)
        config.pop("progress", None)
        config["selections"] = selections
        key = _hash({"config": config, "inputs": self._inputs("generate", "simulate")})
        folder = self.stages["validate"].dir

        def run(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            from lensflow.validate import validate

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
            passed = all(r["pass"] for r in results)
            outputs = {"pass": passed, "results": results}
            exist = [Path(r["out"]) / "summary.json" for r in results]
            return config, outputs, _hash(outputs), exist

        return self._step("validate", key, run)

    def report(self) -> dict[str, Any]:
        key = _hash({"inputs": self._inputs("simulate", "train", "generate", "validate")})

        def run(stage: Stage, _pending: Any) -> tuple[Any, dict, str, list]:
            page, md = self.render()
            (stage.dir / "index.html").write_text(page, encoding="utf-8")
            (stage.dir / "report.md").write_text(md, encoding="utf-8")
            _write_json(stage.dir / "pipeline.json", {"run_dir": str(self.run_dir), "stages": self.records})
            outputs = {"html": str(stage.dir / "index.html"), "markdown": str(stage.dir / "report.md")}
            return {}, outputs, key, [stage.dir / "index.html"]

        return self._step("report", key, run)

    # -- report -----------------------------------------------------------------------------------
    def render(self) -> tuple[str, str]:
        r = self.records
        val = r["validate"]["outputs"]
        train_summary: dict[str, Any] = {}
        try:
            train_summary = json.loads(Path(r["train"]["outputs"]["summary"]).read_text())
        except (OSError, KeyError, json.JSONDecodeError):
            pass
        verdict = "PASS" if val["pass"] else "FAIL"
        lines = [
            f"# lensflow pipeline: {self.train_cfg.name}",
            "",
            f"**Verdict: {verdict}**",
            "",
            f"Run folder: `{self.run_dir}`",
            "",
            "| stage | fingerprint | seconds | finished |",
            "|---|---|---|---|",
        ]
        for s in STAGES[:-1]:
            lines.append(
                f"| {s} | `{str(r[s]['fingerprint'])[:16]}` | {r[s].get('seconds', '')} | "
                f"{r[s].get('finished_utc', '')} |"
            )
        gen = r["generate"]["outputs"]
        lines += [
            "",
            f"- training store: `{r['simulate']['outputs']['store']}`",
            f"- checkpoint: `{r['train']['outputs']['checkpoint']}`",
            f"  (sha256 {r['train']['fingerprint']})",
            f"- best validation bits/dim: {train_summary.get('best_val_bits_per_dim')}",
            f"- mocks: `{gen['mocks']}` ({gen['n_maps']} maps)",
            "",
            "| selection | verdict | failures | report |",
            "|---|---|---|---|",
        ]
        rows = []
        for res in val["results"]:
            link = os.path.relpath(Path(res["out"]) / "report.html", self.stages["report"].dir)
            word = "pass" if res["pass"] else "FAIL"
            fails = "; ".join(res["failures"][:5]) or "-"
            lines.append(f"| {res['label']} | {word} | {fails} | [report.html]({link}) |")
            rows.append(
                f"<tr><td>{html.escape(res['label'])}</td><td class={'ok' if res['pass'] else 'bad'}>"
                f"{word}</td><td>{html.escape(fails)}</td>"
                f"<td><a href='{html.escape(link)}'>report</a></td></tr>"
            )
        md = "\n".join(lines) + "\n"
        stage_rows = "".join(
            f"<tr><td>{s}</td><td><code>{html.escape(str(r[s]['fingerprint'])[:16])}</code></td>"
            f"<td>{r[s].get('seconds', '')}</td>"
            f"<td>{html.escape(str(r[s].get('finished_utc', '')))}</td></tr>"
            for s in STAGES[:-1]
        )
        name = html.escape(str(self.train_cfg.name))
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lensflow pipeline {name}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
.ok{{color:#080}} .bad{{color:#b00;font-weight:bold}}</style>
</head><body>
<h1>lensflow pipeline: {name}</h1>
<p>Verdict: <span class={"ok" if val["pass"] else "bad"}>{verdict}</span></p>
<p>Run folder: <code>{html.escape(str(self.run_dir))}</code></p>
<h2>Stages</h2><table><tr><th>stage</th><th>fingerprint</th><th>seconds</th><th>finished (UTC)</th></tr>
{stage_rows}</table>
<h2>Inputs and outputs</h2><ul>
<li>training store: <code>{html.escape(r["simulate"]["outputs"]["store"])}</code></li>
<li>checkpoint: <code>{html.escape(r["train"]["outputs"]["checkpoint"])}</code>
 (sha256 {html.escape(r["train"]["fingerprint"])})</li>
<li>best validation bits/dim: {html.escape(str(train_summary.get("best_val_bits_per_dim")))}</li>
<li>mocks: <code>{html.escape(r["generate"]["outputs"]["mocks"])}</code>
 ({r["generate"]["outputs"]["n_maps"]} maps)</li></ul>
<h2>Validation</h2><table><tr><th>selection</th><th>verdict</th><th>failures</th><th></th></tr>
{"".join(rows)}</table>
</body></html>
"""
        return page, md

    # -- all --------------------------------------------------------------------------------------
    def run(self) -> int:
        print(f"[pipeline] {self.train_cfg.name} in {self.run_dir}", flush=True)
        steps = [
            ("simulate", lambda: self.simulate()),
            ("train", lambda: self.train(self.records["simulate"]["outputs"]["store"])),
            (
                "generate",
                lambda: self.generate(
                    self.records["train"]["outputs"]["checkpoint"], self.records["simulate"]["outputs"]["store"]
                ),
            ),
            (
                "validate",
                lambda: self.validate(
                    self.records["generate"]["outputs"]["mocks"], self.records["simulate"]["outputs"]["store"]
                ),
            ),
            ("report", lambda: self.report()),
        ]
        for i, (name, step) in enumerate(steps):
            rec = step()
            if self.opts.dry_run and str(rec["fingerprint"]).startswith("dry-run:"):
                for later, _ in steps[i + 1 :]:
                    print(f"[pipeline] {later:<9} run  (after {name})", flush=True)
                return 0
        if self.opts.dry_run:
            return 0
        val, rep = self.records["validate"], self.records["report"]
        passed = bool(val["outputs"]["pass"])
        print(f"[pipeline] {'PASS' if passed else 'FAIL'}: report {rep['outputs']['html']}", flush=True)
        return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the exit code (0 pass, 1 validation failed, 2 bad input)."""
    try:
        return Pipeline(sys.argv[1:] if argv is None else argv).run()
    except (PipelineError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
