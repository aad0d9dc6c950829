"""The commands' defaults as Hydra config nodes: each default lives once, in the Python that uses it.

A command's typed config holds its defaults (a request's ``DEFAULTS``, a settings dataclass, a simulator's preset).
:func:`register` stores them in Hydra's ``ConfigStore`` as ``lensflow/<node>/<name>``, and the YAML under
``conf/`` takes them through its defaults list (``- /lensflow/model@_here_: glow``). So the YAML holds only what
the command line adds: the defaults lists and group choices, required keys, interpolations, experiments. Nothing
reads a command's YAML at run time, and a Python caller's partial config is completed from the same tables.

:func:`register` imports only the tables a root config composes, so that ``generate`` and ``validate`` never
import Lightning (the training settings do).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from lensflow._util.plain import to_plain

__all__ = ["NODES", "ROOTS", "node", "register"]

#: ``node/name`` → ``(module, attribute[, key])``: a mapping (or a settings dataclass, whose default instance is
#: the node; ``key`` picks one entry of a mapping of presets).
NODES: dict[str, tuple[str, ...]] = {
    "generate/default": ("lensflow.generation.job", "DEFAULTS"),
    "infer/default": ("lensflow.inference.run", "DEFAULTS"),
    "ingest/default": ("lensflow.ingestion.request", "DEFAULTS"),
    "validate/default": ("lensflow.validation.config", "DEFAULTS"),
    "simulate/default": ("lensflow.simulation.defaults", "RUN_DEFAULTS"),
    "sim_spec/default": ("lensflow.simulation.defaults", "SPEC_DEFAULTS"),
    "split_fractions/default": ("lensflow.simulation.defaults", "SPLIT_DEFAULTS"),
    "cosmology/planck18": ("lensflow.sims.theory", "PLANCK18"),
    "sim/gaussian_flat": ("lensflow.simulation.defaults", "SIM_PRESETS", "gaussian_flat"),
    "sim/lognormal_flat": ("lensflow.simulation.defaults", "SIM_PRESETS", "lognormal_flat"),
    "sim/lognormal_fullsky": ("lensflow.simulation.defaults", "SIM_PRESETS", "lognormal_fullsky"),
    "sim/nbody_flat": ("lensflow.simulation.defaults", "SIM_PRESETS", "nbody_flat"),
    "model/glow": ("lensflow.model", "ModelSettings"),
    "optim/adamw": ("lensflow.training.settings", "OptimSettings"),
    "check/default": ("lensflow.training.settings", "CheckSettings"),
    "callbacks/default": ("lensflow.training.callbacks", "DEFAULTS"),
}

_SIMS = ("sim_spec/", "split_fractions/", "cosmology/", "sim/")
_TRAIN = (*_SIMS, "model/", "optim/", "check/", "callbacks/")
#: The nodes (prefixes of :data:`NODES`' keys) each root config of ``conf/`` composes.
ROOTS: dict[str, tuple[str, ...]] = {
    "generate": ("generate/",),
    "infer": ("infer/",),
    "ingest": ("ingest/", "split_fractions/"),
    "validate": ("validate/",),
    "simulate": ("simulate/", *_SIMS),
    "train": _TRAIN,
    "bench": _TRAIN,
}

_done: set[str] = set()


def node(path: str) -> dict[str, Any]:
    """The plain defaults of node ``path`` (a fresh copy)."""
    module, attr, *key = NODES[path]
    obj = getattr(importlib.import_module(module), attr)
    if key:
        obj = obj[key[0]]
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        default = obj()
        obj = {f.name: getattr(default, f.name) for f in dataclasses.fields(obj)}
    return to_plain(obj)


def register(root: str | None = None) -> None:
    """Store the nodes that root config ``root`` composes (every node for ``None``) in Hydra's ``ConfigStore``."""
    from hydra.core.config_store import ConfigStore

    prefixes = tuple(p for r in ROOTS.values() for p in r) if root is None else ROOTS.get(root, ())
    store = ConfigStore.instance()
    for path in NODES:
        if path in _done or not path.startswith(prefixes):
            continue
        group, name = path.rsplit("/", 1)
        store.store(group=f"lensflow/{group}", name=name, node=node(path))
        _done.add(path)
