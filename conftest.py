"""Configuration shared by the tests (tests/) and the doctests (fundp/)."""

import os

import pytest
import torch

# Under pytest-xdist (`-n auto`, the README's command) the workers share the cores: one thread each
# when there are at least as many workers as cores, so they do not oversubscribe.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (the README's command) each test file runs on one worker, so
    its module-scoped fixtures (e.g. compiled steps) are built once; the notebook and docs tests
    share one worker so each notebook executes once (``tests/notebook_runs.py`` caches per process)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.nodeid.split("::", 1)[0]
            group = "notebooks" if module.endswith(("test_notebooks.py", "test_docs.py")) else module
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _new_key_scope():
    """Each test and each doctest is its own run: keys used by an earlier one may be used again
    (``dp_step``'s key-reuse guard is process-wide and on by default)."""
    from fundp.guards import forget_keys

    forget_keys()
    yield
