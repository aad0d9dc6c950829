"""The runner's command line: its own options, and the overrides of each command's config, composed once.

Arguments (see ``python -m lensflow.run_experiment --help``): ``generate.KEY=VALUE`` goes to
``conf/generate.yaml``, ``validate.KEY=VALUE`` to ``conf/validate.yaml``, any other ``KEY=VALUE`` to
the training config ``conf/train.yaml``; ``--run-dir``, ``--stages``, ``--force``, ``--dry-run`` and
``--in-process`` steer the runner.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensflow.cli import compose, config_error, open_node_overrides
from lensflow.workflow.stages import STAGES, PipelineError

__all__ = ["PipelineRequest", "given"]


@dataclass(frozen=True)
class PipelineRequest:
    """The runner's options and the three composed configs (train, generate, validate)."""

    run_dir: Path
    stages: tuple[str, ...]
    force: frozenset[str]
    dry_run: bool
    in_process: bool
    train_args: tuple[str, ...]
    gen_args: tuple[str, ...]
    val_args: tuple[str, ...]
    train_cfg: Any
    gen_cfg: Any
    val_cfg: Any

    @classmethod
    def from_config(cls, argv: Sequence[str]) -> PipelineRequest:
        """The request of the runner's command line (its config: its options and each command's overrides, composed
        once); bad input raises :class:`PipelineError`."""
        opts, rest = _parser().parse_known_args(list(argv))
        train, gen, val = [], [], []
        for a in rest:
            if a.startswith("-"):
                raise PipelineError(f"unknown option {a}")
            if "=" not in a and not a.startswith("~"):
                raise PipelineError(f"argument {a!r} is not KEY=VALUE")
            if a.startswith("generate."):
                gen.append(a[len("generate.") :])
            elif a.startswith("validate."):
                val.append(a[len("validate.") :])
            else:
                train.append(a)
        gen, val = open_node_overrides(gen, ("cond",)), open_node_overrides(val, ("select",))
        stages, force = _stage_list(opts.stages, "stages"), frozenset(_stage_list(opts.force, "force"))
        train_cfg = _compose("train", train)
        default = Path(str(train_cfg.paths.output_dir)) / "pipeline" / str(train_cfg.name)
        return cls(
            run_dir=Path(opts.run_dir or default).expanduser().resolve(),
            stages=stages,
            force=force,
            dry_run=opts.dry_run,
            in_process=opts.in_process,
            train_args=tuple(train),
            gen_args=tuple(gen),
            val_args=tuple(val),
            train_cfg=train_cfg,
            gen_cfg=_compose("generate", gen),
            val_cfg=_compose("validate", val),
        )


def _stage_list(s: str, option: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise PipelineError(f"--{option}: unknown stage(s) {bad}; stages are {list(STAGES)}")
    return names


def _compose(name: str, overrides: Sequence[str]) -> Any:
    try:
        return compose(name, overrides)
    except Exception as e:  # noqa: BLE001 - a composition error is a bad command line
        raise PipelineError(f"{name} config: {config_error(e)}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lensflow.run_experiment",
        description="simulate -> train -> generate -> validate -> report for one experiment, skipping stages "
        "that are up to date. generate.KEY=VALUE and validate.KEY=VALUE override those commands' configs; "
        "any other KEY=VALUE overrides the training config.",
    )
    p.add_argument("--run-dir", default=None, help="pipeline folder (default ${paths.output_dir}/pipeline/<name>)")
    p.add_argument("--stages", default=",".join(STAGES), help="run only these stages (the others must be done)")
    p.add_argument("--force", default="", help="run these stages even when up to date")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--in-process", action="store_true", help="run the train stage in this process too")
    return p


def given(overrides: Sequence[str], key: str) -> bool:
    """Whether the command line sets ``key`` (or a key below it) in ``overrides``."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(k == key or k.startswith(key + ".") for k in keys)
