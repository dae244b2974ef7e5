"""Configuration shared by the tests (tests/) and the doctests (fundp/)."""

import pytest


@pytest.fixture(autouse=True)
def _new_key_scope():
    """Each test and each doctest is its own run: keys used by an earlier one may be used again
    (``dp_step``'s key-reuse guard is process-wide and on by default)."""
    from fundp.guards import forget_keys

    forget_keys()
    yield
