"""The verification pass (fundp/engines/ghost/_verify.py): mixing the tracer does not see is caught;
``verify="always"`` and ``verify=False``.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import GhostUnsupportedError
from fundp.testing import reference_step

from ghost_helpers import B, D, assert_exact, features


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_mixing_the_tracer_does_not_know_is_caught_by_verification():
    g = torch.Generator().manual_seed(10)
    params = {"w": torch.randn(3, D, generator=g)}

    def loss_fn(p, b):
        mixed = torch.fft.fft(b["x"], dim=0).real  # mixes the examples; the tracer has no rule for fft
        return F.cross_entropy(F.linear(mixed, p["w"]), b["y"], reduction="none")

    # Default deny: fft has no layout rule, so "auto" leaves the ghost path (micro-batching by vmap);
    # "ghost" refuses, and with the tracer bypassed the verification catches it.
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)
    ref = reference_step(loss_fn, params, features(), max_norm=1.0, expected_batch_size=B)
    out = step(params, features(), fundp.random.key(0))
    torch.testing.assert_close(out.grads["w"], ref.grads["w"], rtol=1e-9, atol=1e-12)
    ghost = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost")
    with pytest.raises(GhostUnsupportedError, match="fft"):
        ghost(params, features(), fundp.random.key(0))


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_verify_always_and_false():
    g = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(3, D, generator=g)}

    def loss_fn(p, b):
        return F.cross_entropy(F.linear(b["x"], p["w"]), b["y"], reduction="none")

    with pytest.raises(ValueError, match="verify"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, verify="sometimes")
    for verify in (False, "first", "always"):
        assert_exact(loss_fn, params, features(), "flat", verify=verify)
