"""``python -m lensflow.bench SUITE [key=value ...]``: run one benchmark suite and print its table."""

from __future__ import annotations

from lensflow.bench import main

if __name__ == "__main__":
    main()  # a bare first word names the suite: `bench stats` is `bench bench=stats`
