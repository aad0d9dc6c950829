"""The field-level check: an emulator's KL gap on reference maps whose exact likelihood is known.

The exact likelihood comes from the built-in flat simulator that wrote the reference store
(:class:`lensflow.sims.truth.StoreTruth`), or from a teacher (``field.teacher``): a trained emulator whose mocks the
reference maps are. A trained emulator is a simulator with an exact likelihood, so an emulator trained on N-body
maps lends one to the non-Gaussian maps it draws, and a student emulator trained on those draws is scored against
it. ``mean(log p_exact − log p_emulator)`` over the reference maps, in bits per pixel, is the emulator's KL
divergence from the truth: the sharpest test of the whole map distribution there is (the summary statistics see
only projections of it). Validation reports it, with its standard error, and gates on it when
``field.kl_tolerance`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lensflow._util.log import get_logger
from lensflow.mapstore import MapStore
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.truth import StoreTruth

__all__ = ["field_check", "teacher_truth"]

log = get_logger(__name__)


class _Teacher:
    """A trained emulator as the exact likelihood of its own draws (``log_prob(maps, params)`` like StoreTruth)."""

    def __init__(self, path: Path, reference: MapStore, device: Any) -> None:
        from lensflow.emulator import Emulator

        self.emulator = Emulator.load(path, device=device)
        names = tuple(self.emulator.param_names)
        if names and tuple(n for n in names if n in reference.meta.param_names) != names:
            raise ValueError(
                f"field.teacher {path} is conditional on {list(names)}, but the reference store {reference.path} "
                f"has parameters {list(reference.meta.param_names)}: the teacher's log p needs each map's θ"
            )
        if tuple(self.emulator.map_shape) != (reference.channels, reference.npix, reference.npix):
            raise ValueError(
                f"field.teacher {path} models maps {list(self.emulator.map_shape)}, the reference store "
                f"{reference.path} holds {[reference.channels, reference.npix, reference.npix]}"
            )
        self.param_names = names
        self._columns = [list(reference.meta.param_names).index(n) for n in names]

    def log_prob(self, maps: np.ndarray, params: np.ndarray | None) -> np.ndarray:
        cond = None if not self.param_names else np.asarray(params)[:, self._columns]
        return self.emulator.log_prob(maps, cond=cond)


def teacher_truth(path: Path, reference: MapStore, device: Any = "cpu") -> _Teacher:
    """The exact likelihood of maps drawn from the trained emulator at ``path``; one-line ``ValueError`` when it is
    conditional and the reference store lacks its parameters, or models another map shape."""
    return _Teacher(Path(path), reference, device)


def field_check(options: Any, reference: MapStore, indices: np.ndarray, device: Any = "cpu") -> dict[str, Any] | None:
    """The emulator's KL gap on (up to ``options.max_maps``) selected reference maps; ``None`` without an emulator.

    Raises ``ValueError`` (one line) when the reference store has no exact likelihood or does not fit the emulator.
    """
    if options.emulator is None:
        return None
    from lensflow.emulator import Emulator

    teacher = getattr(options, "teacher", None)
    if teacher is not None:
        truth: Any = teacher_truth(teacher, reference, device)
    else:
        truth = StoreTruth(reference.meta, f"reference {reference.path}")
    emulator = Emulator.load(options.emulator, device=device)
    idx = np.asarray(indices)[: options.max_maps]
    maps = reference.read(idx)
    params = reference.read_params(idx) if truth.param_names else None
    exact = truth.log_prob(maps, params)
    model = emulator.log_prob(maps, cond=None if params is None or not emulator.param_names else params)
    gap, se = kl_gap_bits(exact, model, int(np.prod(maps.shape[1:])))
    gating = options.kl_tolerance is not None
    passed = (not gating) or gap <= options.kl_tolerance
    record: dict[str, Any] = {
        "emulator": str(options.emulator),
        "truth": f"teacher {teacher}" if teacher is not None else "the simulator of the reference store",
        "n_maps": int(idx.size),
        "kl_bits_per_dim": gap,
        "kl_se": se,
        "exact_bits_per_dim": float(-exact.mean() / (maps[0].size * np.log(2.0))),
        "kl_tolerance": options.kl_tolerance,
        "gating": gating,
        "pass": bool(passed),
        "failures": []
        if passed
        else [f"field: KL gap {gap:.5f} ± {se:.5f} bits/pixel > tolerance {options.kl_tolerance:g}"],
    }
    log.info("field-level KL gap on %d reference maps: %.5f ± %.5f bits/pixel", idx.size, gap, se)
    return record
