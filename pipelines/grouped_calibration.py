"""False-alarm rate and power of validate's comparison when the reference maps come in correlated groups (boxes).

The random-effects model of tests/test_compare_clusters.py: a grouped reference of G boxes x n maps (within-box
correlation rho) against 2,000 independent maps of the same marginal (an emulator's mocks), optionally with one
bin shifted by ``shift`` of its standard deviations; each pair compared with clustered errors (the store's
realization ids) and, for contrast, as if the maps were independent (label permutations).

    python pipelines/grouped_calibration.py --pairs 20 --out runs/grouped.json [--candidates 1000 --cells 1,3,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_compare_clusters import _maps, _sets  # noqa: E402  (the model the tests check)

from lensflow.compare import compare  # noqa: E402

CELLS = [(40, 50, 0.05, 0.0), (40, 50, 0.3, 0.0), (20, 100, 0.3, 0.0), (10, 200, 0.3, 0.0), (40, 50, 0.3, 0.5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--candidates", type=int, default=2000, help="independent candidate maps per pair")
    p.add_argument("--cells", default="all", help="comma-separated cell indices of CELLS, or all")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    cells = CELLS if a.cells == "all" else [CELLS[int(i)] for i in a.cells.split(",")]
    for n_groups, per_group, rho, shift in cells:
        t0, fails = time.time(), {"clustered": 0, "permutation": 0}
        for k in range(a.pairs):
            rng = np.random.default_rng([7, n_groups, int(rho * 100), int(shift * 100), k])
            ref, cand = _maps(rng, n_groups, per_group, rho), _maps(rng, a.candidates, 1, rho, shift=shift)
            groups = (np.repeat(np.arange(n_groups), per_group), None)
            fails["clustered"] += not compare(_sets(ref), _sets(cand), seed=k, groups=groups)["pass"]
            fails["permutation"] += not compare(_sets(ref), _sets(cand), seed=k)["pass"]
        rows.append(
            {"boxes": n_groups, "maps_per_box": per_group, "rho": rho, "shift_sd": shift, "pairs": a.pairs,
             "candidates": a.candidates, **fails,
             "seconds": round(time.time() - t0)}
        )  # fmt: skip
        print(rows[-1], flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
