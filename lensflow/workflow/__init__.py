"""The end-to-end pipeline of ``python -m lensflow.run_experiment``: simulate → train → generate → validate → report.

::

    python -m lensflow.run_experiment +experiment=kappa_quick
    python -m lensflow.run_experiment +experiment=kappa generate.n_maps=5000 validate.max_maps=2000
    python -m lensflow.run_experiment +experiment=kappa_quick --force train    # retrain (later stages follow)
    python -m lensflow.run_experiment +experiment=kappa_quick --dry-run        # say what would run, run nothing

Arguments::

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

A stage is skipped when its record (``<run-dir>/<stage>/stage.json``, :mod:`.stages`) matches the hash of
its resolved config and its inputs' fingerprints and its outputs exist, so an interrupted pipeline
picks up where it stopped: the simulation is cached by spec, training resumes from ``last.ckpt`` of an
unfinished run of the same config, and generation resumes its batches. Modules: ``options`` (the
command line, composed once), ``stages`` (records), ``runner`` (the five stages).

Exit code: 0 when every validation passes, 1 when one fails (gate deployments on it), 2 on bad input.
"""

from __future__ import annotations

from lensflow.workflow.runner import Pipeline, run_pipeline
from lensflow.workflow.stages import STAGES, PipelineError, Stage

__all__ = ["STAGES", "Pipeline", "PipelineError", "Stage", "run_pipeline"]
