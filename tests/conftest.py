"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, restored after. The tests measure correctness on small tensors;
    on a loaded 2-core machine OpenMP spins at every barrier, so two threads make each op cost milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
