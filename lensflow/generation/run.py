"""``generate(cfg)``: mock κ maps from a trained Glow checkpoint, as a map store or FITS.

The composed config becomes a :class:`~lensflow.generation.job.GenerationRequest` once, at entry; the
checkpoint is read and hashed once (one read of the file) and its module serves every batch, or its tensors
are handed to the worker processes. Bad input raises a one-line ``ValueError`` before any file is created;
a failed sampling raises :class:`~lensflow.generation.sampler.GenerationError` and keeps finished batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lensflow._util.devices import resolve_devices
from lensflow._util.lock import target_lock
from lensflow._util.log import get_logger
from lensflow.checkpoint import read_checkpoint_hashed
from lensflow.conditioning import condition_grid
from lensflow.generation import job as job_mod
from lensflow.generation.job import GenerationRequest, Plan
from lensflow.generation.workers import Work, run_batches
from lensflow.model import KappaFlow

__all__ = ["generate", "written_line"]

log = get_logger(__name__)


def generate(cfg: Any) -> Path:
    """Generate mock maps as configured; returns the output path.

    Args:
        cfg: the composed ``generate`` config (``conf/generate.yaml``), a mapping of its keys, or a
            :class:`~lensflow.generation.job.GenerationRequest`.
    """
    request = cfg if isinstance(cfg, GenerationRequest) else GenerationRequest.from_config(cfg)
    device = resolve_devices(request.devices, request.accelerator)
    ckpt, sha256 = read_checkpoint_hashed(request.ckpt)  # one-line ValueError for foreign files
    module = KappaFlow.from_checkpoint(ckpt, request.ckpt)
    grid = condition_grid(request.cond, module.param_names)
    if module.training_box is not None:  # before any file: outside the box the emulator extrapolates
        module.training_box.check(grid, request.allow_extrapolation)
    plan = Plan.of(request, sha256, module.param_names, grid)
    # One run per output for the job's life: a second one is refused (the kernel frees the lock of a killed run,
    # whose parts the next run resumes).
    with target_lock(plan.out):
        return _generate(request, plan, module, ckpt, device)


def _generate(request: GenerationRequest, plan: Plan, module: KappaFlow, ckpt: Any, device: Any) -> Path:
    if job_mod.out_exists(plan.out) and not request.overwrite:
        if job_mod.already_complete(plan, request.format):
            job_mod.remove_work_folder(plan)
            log.info("%s is already complete (%d maps); removed its work folder", plan.out, plan.n_total)
            return plan.out
        raise ValueError(f"out: {plan.out} exists; pass overwrite=true to replace it")
    n_done = job_mod.prepare_parts(plan, request.overwrite)
    if n_done:
        log.info("resuming: %d of %d batches already in %s", n_done, plan.n_batches, plan.parts)
    work = Work(
        plan,
        module.meta,
        request.seed,
        request.temperature,
        request.ema,
        request.max_attempts,
        request.noise,
        request.allow_extrapolation,
    )
    t0 = time.perf_counter()
    written = run_batches(work, module, ckpt, plan.todo(), device, request.progress)
    elapsed = time.perf_counter() - t0
    redrawn = job_mod.scan_parts(plan)
    training = {"meta": module.meta, "npix": module.npix, "store": module.store}
    meta = job_mod.final_meta(plan, request, training, redrawn)
    job_mod.merge_parts(plan, request, meta, module.npix)
    job_mod.remove_work_folder(plan)
    rate = written / elapsed if elapsed > 0 and written else float("nan")
    log.info(
        "generated %d of the %d maps of %s in this run at %.1f maps/s on %d %s device(s); %d non-finite redraw(s)",
        written,
        plan.n_total,
        plan.out,
        rate,
        device[1],
        device[0],
        len(redrawn),
    )
    return plan.out


def written_line(out: Path) -> str:
    """The command's result on stdout: ``wrote N mock maps to OUT`` (N read back from the output)."""
    import json

    from lensflow.mapstore import open_store

    if job_mod.sidecar(out).is_file():  # FITS output: its provenance sidecar counts the maps
        n = json.loads(job_mod.sidecar(out).read_text())["n_maps"]
    else:
        with open_store(out) as st:
            n = len(st)
    return f"wrote {n} mock maps to {out}"
