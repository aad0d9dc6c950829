"""The field-level check: an emulator's KL gap on reference maps whose exact likelihood is known.

When the reference store was written by a built-in flat simulator (:class:`lensflow.sims.truth.StoreTruth`),
``mean(log p_exact − log p_emulator)`` over the reference maps, in bits per pixel, is the emulator's KL
divergence from the simulator: the sharpest test of the whole map distribution there is (the summary
statistics see only projections of it). Validation reports it, with its standard error, and gates on it when
``field.kl_tolerance`` is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lensflow._util.log import get_logger
from lensflow.mapstore import MapStore
from lensflow.sims.exact import kl_gap_bits
from lensflow.sims.truth import StoreTruth

__all__ = ["field_check"]

log = get_logger(__name__)


def field_check(options: Any, reference: MapStore, indices: np.ndarray, device: Any = "cpu") -> dict[str, Any] | None:
    """The emulator's KL gap on (up to ``options.max_maps``) selected reference maps; ``None`` without an emulator.

    Raises ``ValueError`` (one line) when the reference store has no exact likelihood or does not fit the emulator.
    """
    if options.emulator is None:
        return None
    from lensflow.emulator import Emulator

    truth = StoreTruth(reference.meta, f"reference {reference.path}")
    emulator = Emulator.load(options.emulator, device=device)
    idx = np.asarray(indices)[: options.max_maps]
    maps = reference.read(idx)
    params = reference.read_params(idx) if truth.param_names else None
    exact = truth.log_prob(maps, params)
    model = emulator.log_prob(maps, cond=params)
    gap, se = kl_gap_bits(exact, model, int(np.prod(maps.shape[1:])))
    gating = options.kl_tolerance is not None
    passed = (not gating) or gap <= options.kl_tolerance
    record: dict[str, Any] = {
        "emulator": str(options.emulator),
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
