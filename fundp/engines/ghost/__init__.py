"""The ``"ghost"`` engine: exact per-example norms without per-example gradients, and book-keeping.

One forward and one backward, like non-private training.  During the forward a
``TorchFunctionMode`` (:mod:`._tracer`) watches every torch call made by ``loss_fn`` and follows

* **the rows**: which rows of each tensor computed from the batch belong to which example
  (:mod:`._layout`) — through views, reshapes (GPT-2's ``x.view(-1, d)``), transposes
  (sequence-first ``[T, B, d]``), indexing, concatenation and reorderings by a known permutation
  (``x[x.argsort()]``, ``flip(0)``); an op that mixes examples (batch-norm statistics, a float
  reduction over the batch) raises :class:`ExamplesInteractError`;
* **the parameters**: every tensor computed from the parameters alone (views, ``.T``, casts,
  slices, ``expand``, position-table lookups) and every call that reads one.

A call of a supported op on a parameter-derived tensor is handled by a *rule* (one module per
family: :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.norms`, :mod:`.broadcast`,
:mod:`.attention`; :func:`register_rule` adds one).  The rule computes the output from detached
parameters and adds zero *probes*; the backward asks for ``d sum_i L_i / d probe`` only — row ``i``
is example ``i``'s output gradient ``G_i`` — so autograd never forms a weight gradient.  Each use
resolves to an exact per-example form (:class:`Factor` ``G_i^T A_i``, :class:`Ids`, :class:`Rows`);
all uses of a parameter are summed before its norm (:mod:`._norms`), and the clipped sum is
book-keeping, ``(c ⊙ G)^T A`` — no second backward.

**Exact or refuse.**  A parameter is handled by the ghost path only if every use of it is
attributed by a rule to rows whose owner is known.  Anything else is reported:
``grad_method="ghost"`` raises :class:`GhostUnsupportedError` naming the parameter and the reason;
``"auto"`` computes those parameters' per-example gradients with ``vmap(grad)`` (the mixed plan).
Uses the tracer cannot see (``torch.jit``, custom ``autograd.Function``, extensions) are found
independently: the rules compute from detached parameters, so any autograd path from the loss
to a parameter is a use they did not take (a graph walk, eagerly).  And the verification pass
(:mod:`._verify`, ``dp_step(verify="first")`` by default) checks the engine against plain autograd
and single examples on real data on the first call per input signature; on every later call a
cheap check (:mod:`._consistency`, ``check_batch_consistency=True``) reruns the forward on a random
quarter of the batch and compares the losses, so couplings hidden from the tracer are caught when they act.

:func:`ghost_plan` shows the plan for a model.
"""

from fundp.engines.ghost._consistency import BatchConsistencyError
from fundp.engines.ghost._engine import GhostUnsupportedError, ghost_plan, make_ghost_engine
from fundp.engines.ghost._layout import ExamplesInteractError, to_examples
from fundp.engines.ghost._registry import RULES, register_rule
from fundp.engines.ghost._uses import Factor, Ids, Rows
from fundp.engines.ghost._verify import GhostVerificationError

__all__ = [
    "BatchConsistencyError",
    "ExamplesInteractError",
    "Factor",
    "GhostUnsupportedError",
    "GhostVerificationError",
    "Ids",
    "RULES",
    "Rows",
    "ghost_plan",
    "make_ghost_engine",
    "register_rule",
    "to_examples",
]
