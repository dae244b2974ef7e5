"""Shared test configuration.

* hypothesis profile ``ci`` (no deadline: the first call of a step compiles or traces);
* ``variant`` fixture: every equality test of a step, engine or optimizer that takes it runs
  twice, eagerly and under ``torch.compile`` (dynamo reset before and after)::

      def test_step_matches_reference(variant):
          step = variant(fundp.dp_step(loss_fn, ...))   # the step itself, or torch.compile(step)
          ...

  The compiled variant uses the backend named by ``FUNDP_TEST_COMPILE_BACKEND`` (default
  ``aot_eager``: dynamo tracing and AOT autograd exactly as under inductor, without inductor's
  code generation, which takes ~15 s per graph on a 2-core CPU).  Set it to ``inductor`` to run
  the generated kernels too, e.g. on a GPU machine.
"""

import os
import sys

import pytest
import torch
from hypothesis import settings

from fundp.testing import VARIANTS, Variant, reset_compiler

# Test helpers (tests/models.py) import as a top-level module.
sys.path.insert(0, os.path.dirname(__file__))

# derandomize: every run draws the same examples (tests fix their keys; CI must not fail by chance).
settings.register_profile("ci", deadline=None, max_examples=40, print_blob=True, derandomize=True)
settings.load_profile("ci")
# (threads per worker: the root conftest.py)

COMPILE_BACKEND = os.environ.get("FUNDP_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(params=VARIANTS)
def variant(request):
    """A :class:`fundp.testing.Variant`: ``variant(fn)`` is ``fn`` or ``torch.compile(fn)``."""
    reset_compiler()
    yield Variant(request.param, backend=COMPILE_BACKEND)
    reset_compiler()


@pytest.fixture
def float64_by_default():
    """float64 for every tensor a test creates, restored afterwards (no global side effect)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
