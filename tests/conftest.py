"""Shared fixtures: one torch thread (helpers that build things live in tests/helpers.py)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: thread start-up costs more than it saves (and the CI machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
