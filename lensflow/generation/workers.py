"""Running a job's batches: in this process, or fanned out to one worker process per device.

``devices=N`` starts N worker processes (one per GPU, or N CPU processes) that take batches round-robin
into the same work folder, so the merged store is the same as with one device. Workers get the checkpoint
already read by the parent (its tensors travel through shared memory), never the file again.
"""

from __future__ import annotations

import queue as queue_mod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lensflow._util.progress import progress as progress_bar
from lensflow.generation import job as job_mod
from lensflow.generation.sampler import GenerationError, Sampler, ShapeNoise
from lensflow.mapstore import StoreMeta
from lensflow.model import KappaFlow

__all__ = ["Work", "run_batches"]


@dataclass(frozen=True)
class Work:
    """What every process needs to draw and write batches (picklable)."""

    plan: job_mod.Plan
    meta: StoreMeta  # the training maps' metadata
    seed: int
    temperature: float
    ema: bool
    max_attempts: int
    noise: ShapeNoise | None
    allow_extrapolation: bool = False  # checked once, before any file (generation.run)

    def sampler(self, module: KappaFlow, device: torch.device) -> Sampler:
        return Sampler(
            module,
            device,
            self.seed,
            self.temperature,
            self.ema,
            self.max_attempts,
            self.noise,
            self.allow_extrapolation,
        )

    def batch(self, sampler: Sampler, b: int) -> tuple[int, int]:
        """Sample batch ``b`` and write its part; returns (maps, redraws)."""
        idx = self.plan.batch_indices(b)
        maps, redrawn = sampler.draw(idx, self.plan.cond_rows(idx))
        job_mod.write_part(self.plan, b, maps, redrawn, self.meta)
        return len(idx), len(redrawn)


def _worker(
    rank: int, nprocs: int, work: Work, ckpt: Mapping[str, Any], todo: list[int], kind: str, threads: int, q: Any
) -> None:
    """One worker process: batches ``todo[rank::nprocs]`` on its own device."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(f"cuda:{rank}") if kind == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        sampler = work.sampler(KappaFlow.from_checkpoint(ckpt).to(device), device)
        for b in todo[rank::nprocs]:
            n, r = work.batch(sampler, b)
            q.put(("done", rank, n, r))
        q.put(("finished", rank, 0, 0))
    except BaseException as e:  # report one line to the parent, then die with the traceback
        q.put(("error", rank, f"{type(e).__name__}: {e}".splitlines()[0], 0))
        raise


def run_batches(
    work: Work,
    module: Any,
    ckpt: Mapping[str, Any],
    todo: list[int],
    device: tuple[str, int],
    show_progress: bool,
) -> int:
    """Sample and write the batches in ``todo``; returns the maps written by this run.

    ``module`` (on the CPU) serves one process; ``ckpt`` (the checkpoint dict it came from) is handed to
    worker processes when ``device = (kind, count)`` asks for more than one.
    """
    kind, nprocs = device
    done = work.plan.n_total - sum(len(work.plan.batch_indices(b)) for b in todo)
    bar = progress_bar(work.plan.n_total, unit="map", desc="generate", enabled=show_progress)
    if done:
        bar.update(done)  # batches finished by an earlier run
    counts = {"written": 0, "redraws": 0}

    def tick(n: int, r: int) -> None:
        counts["written"] += n
        counts["redraws"] += r
        bar.update(n)
        bar.set_postfix(redraws=counts["redraws"], refresh=False)

    try:
        if nprocs == 1 or len(todo) <= 1:
            dev = torch.device("cuda:0" if kind == "cuda" else "cpu")
            sampler = work.sampler(module.to(dev).eval(), dev)
            for b in todo:
                tick(*work.batch(sampler, b))
        else:
            _fan_out(work, ckpt, todo, kind, min(nprocs, len(todo)), tick)
        return counts["written"]
    finally:
        bar.close()


def _fan_out(work: Work, ckpt: Mapping[str, Any], todo: list[int], kind: str, nprocs: int, tick: Any) -> None:
    threads = max(1, torch.get_num_threads() // nprocs) if kind == "cpu" else 1
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    pc = torch.multiprocessing.start_processes(
        _worker,
        args=(nprocs, work, dict(ckpt), todo, kind, threads, q),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    errors: list[str] = []

    def drain(timeout: float) -> None:
        try:
            while True:
                what, rank, a, r = q.get(timeout=timeout)
                if what == "done":
                    tick(a, r)
                elif what == "error":
                    errors.append(f"worker {rank}: {a}")
        except queue_mod.Empty:
            pass

    try:
        while not pc.join(timeout=0.05):
            drain(0.2)
        drain(0.05)
    except Exception as e:  # a worker raised or died (e.g. killed for memory)
        drain(0.5)
        msg = errors[0] if errors else " ".join(str(e).split()[:40])
        raise GenerationError(
            f"generation failed in a worker process ({msg}); finished batches are kept "
            f"in {work.plan.parts}, re-run the command to resume"
        ) from None
    finally:
        for p in pc.processes:  # on any way out (also Ctrl-C) no worker is left behind
            if p.is_alive():
                p.terminate()
