"""Configuration shared by the tests (tests/) and the doctests (fundp/)."""

import os

import pytest
import torch

# Under pytest-xdist (`-n auto`, the README's command) the workers share the cores: one thread each
# when there are at least as many workers as cores, so they do not oversubscribe.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _new_key_scope():
    """Each test and each doctest is its own run: keys used by an earlier one may be used again
    (``dp_step``'s key-reuse guard is process-wide and on by default)."""
    from fundp.guards import forget_keys

    forget_keys()
    yield
