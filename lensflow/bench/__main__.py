"""``python -m lensflow.bench SUITE [key=value ...]``: run one benchmark suite and print its table."""

from __future__ import annotations

import sys

from lensflow.bench import main

if __name__ == "__main__":
    # A bare first word names the suite: `bench stats` is `bench bench=stats` in Hydra terms.
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        sys.argv[1] = f"bench={sys.argv[1]}"
    main()
