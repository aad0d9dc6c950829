#!/usr/bin/env python
"""Old path of ``python -m lensflow.pipeline`` (the end-to-end runner; see :mod:`lensflow.pipeline`)."""

from lensflow.cli import exit_with
from lensflow.pipeline.__main__ import main

if __name__ == "__main__":
    exit_with(main)
