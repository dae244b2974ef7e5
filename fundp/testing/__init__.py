"""Testing tools for DP mechanisms built with fundp (or without it).

* :func:`assert_matches_vmap` — a noiseless ``dp_step`` (any ``grad_method`` / ``clip_style``)
  or your own step against single-example gradients from one ``torch.autograd`` backward per
  example, clipped by hand in float64 (:func:`reference_step`, :func:`micro_batch_grads`);
* :func:`empirical_sensitivity` — the largest change of a clipped sum when one example is
  removed or replaced, to compare with the sensitivity it claims (:func:`tree_distance`);
* :func:`assert_trees_close` — chex-style pytree comparison that names the failing leaf;
* :class:`Variant`, :func:`compiled_variants` — the same function eagerly and under
  ``torch.compile``, dynamo reset in between (:func:`reset_compiler`);
* :mod:`fundp.testing.strategies` — hypothesis strategies for per-example gradient pytrees,
  masks and small models (needs ``hypothesis``; nothing else here does).

Example:
  >>> import torch, fundp
  >>> from fundp.testing import assert_matches_vmap, empirical_sensitivity
  >>> loss_fn = lambda p, x: (x @ p["w"]) ** 2
  >>> params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
  >>> x = torch.tensor([[0.1, 0.2], [1.0, 3.0], [-2.0, 0.5], [0.0, 0.01]], dtype=torch.float64)
  >>> _ = assert_matches_vmap(loss_fn, params, x, max_norm=0.5)
  >>> empirical_sensitivity(fundp.clipped_grad_sum(loss_fn, max_norm=0.5), params, x) <= 0.5 + 1e-12
  True
"""

from fundp.testing.reference import ReferenceStep, assert_matches_vmap, micro_batch_grads, reference_step
from fundp.testing.sensitivity import empirical_sensitivity, tree_distance
from fundp.testing.trees import assert_trees_close, default_tolerances, leaf_names
from fundp.testing.variants import VARIANTS, Variant, compiled_variants, reset_compiler

__all__ = [
    "ReferenceStep",
    "VARIANTS",
    "Variant",
    "assert_matches_vmap",
    "assert_trees_close",
    "compiled_variants",
    "default_tolerances",
    "empirical_sensitivity",
    "leaf_names",
    "micro_batch_grads",
    "reference_step",
    "reset_compiler",
    "tree_distance",
]
