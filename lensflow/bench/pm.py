"""Benchmark ``pm``: lensflow's particle-mesh simulator against JaxPM, same mesh, particles and steps, one process.

Rows:

* ``pm/step``: kick-drift-kick steps per second (CIC paint, FFT, 1/k², finite-difference gradient, CIC readout of
  three force components, kick and drift), on ``n³`` particles and a ``(B·n)³`` mesh. The baseline is the same
  step written with JaxPM's ``pm_forces`` (jit-compiled; its compile time is excluded by a warm-up step), which
  takes one particle per mesh cell: the comparison rows use ``mesh_factor: 1``. The two are timed interleaved,
  best of ``steps``, so machine load hits both alike.
* ``pm/box``: seconds and peak resident memory (GiB) of one whole box at the default spec (``conf/sim/nbody_flat``:
  2LPT, 10 steps, lens planes), each size in a fresh process so the peaks do not mix.
* ``pm/maps``: 64² κ maps per minute cut from a box's planes.

JaxPM is optional: without it the baseline rows say so and carry no ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from lensflow._util.log import get_logger
from lensflow.bench import suite_config

log = get_logger(__name__)

#: The keys of ``conf/bench/pm.yaml`` (where their defaults and meanings are); :func:`run` needs them all.
KEYS: tuple[str, ...] = (
    "n_particles", "mesh_factor", "box_size", "steps", "box_runs", "maps", "devices", "threads", "seed",
)  # fmt: skip
_MISSING = "JaxPM pm_forces (NOT INSTALLED: pip install jax jaxpm)"
_BASELINE = "JaxPM pm_forces KDK (jit)"


def _initial(n: int, mesh: int, seed: int) -> np.ndarray:
    """A lattice displaced by a smooth random field: positions [n³, 3] float32 in mesh units."""
    rng = np.random.default_rng(seed)
    g = np.arange(n, dtype=np.float32) * (mesh / n)
    q = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return ((q + rng.normal(0, 0.5, q.shape).astype(np.float32)) % mesh).astype(np.float32)


def lensflow_step(x0: np.ndarray, mesh: int, device: str) -> Callable[[], None]:
    """One lensflow KDK step (force + kick + drift) on a persistent state."""
    from lensflow.sims.nbody.pm import forces

    x = torch.from_numpy(x0.copy()).to(device)
    p = torch.zeros_like(x)

    def step() -> None:
        f = forces(x, mesh, 0.3)
        p.add_(f, alpha=0.01)
        x.add_(p, alpha=0.01).remainder_(float(mesh))
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def jaxpm_step(x0: np.ndarray, mesh: int) -> Callable[[], None] | None:
    """The same step with JaxPM's ``pm_forces`` under ``jax.jit``; ``None`` without JaxPM."""
    try:
        import jax
        import jax.numpy as jnp
        from jaxpm.pm import pm_forces
    except ImportError:
        return None
    shape = (mesh,) * 3

    @jax.jit
    def kdk(x, p):
        f = pm_forces(x, mesh_shape=shape) * 1.5 * 0.3
        p = p + 0.01 * f
        return jnp.mod(x + 0.01 * p, mesh), p

    n = round(x0.shape[0] ** (1 / 3))
    if n != mesh:  # JaxPM's CIC takes one particle per mesh cell, positions shaped like the mesh
        return None
    x = jnp.asarray(x0).reshape(n, n, n, 3)
    state = [x, jnp.zeros_like(x)]

    def step() -> None:
        state[0], state[1] = kdk(state[0], state[1])
        state[0].block_until_ready()

    return step


def _have_jaxpm() -> bool:
    try:
        import jaxpm  # noqa: F401
    except ImportError:
        return False
    return True


def _time_once(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def _step_rows(c: Mapping[str, Any], device: str) -> list[dict[str, Any]]:
    rows = []
    for n in c["n_particles"]:
        mesh = int(c["mesh_factor"]) * int(n)
        x0 = _initial(int(n), mesh, int(c["seed"]))
        ours = lensflow_step(x0, mesh, device)
        theirs = jaxpm_step(x0, mesh) if device == "cpu" else None
        missing = _MISSING if theirs is None and device == "cpu" and _have_jaxpm() is False else None
        if theirs is None and missing is None:
            missing = "JaxPM: n/a (its CIC needs mesh_factor = 1)" if device == "cpu" else "JaxPM: CPU only here"
        ours()  # warm-up (numba compile on first use)
        if theirs is not None:
            theirs()  # jit compile
        t_ours, t_theirs = [], []
        for _ in range(int(c["steps"])):
            t_ours.append(_time_once(ours))
            if theirs is not None:
                t_theirs.append(_time_once(theirs))
        v = 1.0 / min(t_ours)
        base = 1.0 / min(t_theirs) if t_theirs else None
        rows.append(
            {
                "benchmark": "pm/step",
                "device": device,
                "variant": f"lensflow {n}^3 particles, {mesh}^3 mesh",
                "baseline": _BASELINE if theirs is not None else missing,
                "value": v,
                "unit": "steps/s",
                "ratio": None if base is None else v / base,
                "baseline_value": base,
            }
        )
        log.info("pm/step %d^3: %.3g steps/s (JaxPM %s)", n, v, base)
    return rows


_BOX_SCRIPT = """
import json, resource, sys, time, torch
from lensflow.sims.nbody import NBodySimulator
from lensflow.sims.theory import PLANCK18
n, box, B, device, maps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sim = NBodySimulator(64, 3.28, PLANCK18, 1.0, box_size=box, n_particles=n, mesh_factor=B, device=device)
t = time.perf_counter(); planes = sim.box_planes(1, 0); t_box = time.perf_counter() - t
t = time.perf_counter(); sim.maps(planes, 1, range(maps)); t_maps = time.perf_counter() - t
gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"box_s": t_box, "maps_s": t_maps, "rss_gib": rss, "gpu_gib": gpu}))
"""


def _box_rows(c: Mapping[str, Any], device: str) -> list[dict[str, Any]]:
    rows = []
    for n in c["box_runs"]:
        args = [str(n), str(c["box_size"]), "2", device, str(c["maps"])]
        res = subprocess.run([sys.executable, "-c", _BOX_SCRIPT, *args], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"bench pm: the {n}^3 box run failed: {res.stderr.strip().splitlines()[-1:]}")
        m = json.loads(res.stdout.strip().splitlines()[-1])
        mem = m["gpu_gib"] if m["gpu_gib"] is not None else m["rss_gib"]
        common = {"device": device, "variant": f"lensflow {n}^3, box {c['box_size']} Mpc/h"}
        rows.append({"benchmark": "pm/box", **common, "value": m["box_s"], "unit": "s", "peak_gib": mem})
        rows.append({"benchmark": "pm/maps", **common, "value": 60 * c["maps"] / m["maps_s"], "unit": "maps/min (64²)"})
        log.info("pm/box %d^3: %.1f s, peak %.2f GiB", n, m["box_s"], mem)
    return rows


def run(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``conf/bench/pm.yaml`` on every device asked for that is present."""
    c = suite_config(cfg, KEYS, "pm")
    if c["threads"]:
        torch.set_num_threads(int(c["threads"]))
    rows: list[dict[str, Any]] = []
    for device in c["devices"]:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        rows += _step_rows(c, device)
        rows += _box_rows(c, device)
    return rows
