"""fundp: functional, JAX-style differential privacy for PyTorch, built on ``torch.func``.

The pieces are small pure functions that compose into the stateless ``dp_step`` transform:

* :func:`per_sample_grads` — ``vmap`` over ``grad``: per-example gradients ``[B, *shape]``;
* :func:`per_sample_norms`, :func:`clip` — per-example L2 norms and clipping;
* :func:`noise` — keyed Gaussian noise (:mod:`fundp.random` holds the keys);
* :class:`Ledger`, :func:`accountant_step`, :func:`epsilon`, :func:`calibrate_noise` — accounting;
* :func:`dp_step` — one DP-SGD step, ``(sum_i clip(g_i) + N(0, (sigma C)^2)) / (q N)``;
  :func:`clipped_grad_sum` / :func:`privatize` are its two halves (the sensitivity travels with
  the :class:`ClippedSum`);
* :mod:`fundp.adaptive` (quantile clipping), :mod:`fundp.mf` (correlated / matrix-factorization
  noise) — stateful mechanisms whose state is a value passed in and returned;
* :mod:`fundp.engines.ghost` — exact per-example norms from one backward (or a refusal);
* :mod:`fundp.user_level` (user-level DP: clip each user's summed gradient, sample users),
  :mod:`fundp.one_run_audit` (Steinke–Nasr–Jagielski auditing in one training run);
* :mod:`fundp.testing` — reference checks and hypothesis strategies for your own mechanisms.
"""

from fundp import audit, checkpoint, optim, random, secure, types
from fundp.compile import compile, dynamo_options as compile_options
from fundp.budget import Budget, BudgetExceededError
from fundp.clipping import clip, clip_factors, clip_sensitivity, per_sample_norms
from fundp.grads import per_sample_grads
from fundp.model_check import UnsupportedModuleError, check_model, functional_call
from fundp.noise import add_gaussian_noise, noise
from fundp.step import ClippedSum, StepResult, accumulate, add_clipped_sums, clipped_grad_sum, dp_step, privatize, split_batch
from fundp.types import Step
from fundp import adaptive, data, datasets, distributed, loader, mf, one_run_audit, sampling, sharded_checkpoint, sharding, user_level  # noqa: E402  (after step: they build on it)
from fundp.train_state import TrainState, train_step

from fundp.accounting import Ledger, accountant_step, calibrate_noise, delta, epsilon, max_steps

__version__ = "0.2.0"

__all__ = [
    "Budget",
    "Step",
    "TrainState",
    "accumulate",
    "adaptive",
    "datasets",
    "add_gaussian_noise",
    "loader",
    "mf",
    "one_run_audit",
    "sampling",
    "user_level",
    "split_batch",
    "train_step",
    "types",
    "BudgetExceededError",
    "ClippedSum",
    "Ledger",
    "StepResult",
    "UnsupportedModuleError",
    "accountant_step",
    "audit",
    "add_clipped_sums",
    "calibrate_noise",
    "check_model",
    "checkpoint",
    "clip",
    "compile",
    "compile_options",
    "clip_factors",
    "clip_sensitivity",
    "clipped_grad_sum",
    "data",
    "delta",
    "distributed",
    "dp_step",
    "epsilon",
    "functional_call",
    "max_steps",
    "noise",
    "optim",
    "per_sample_grads",
    "per_sample_norms",
    "privatize",
    "random",
    "secure",
    "sharded_checkpoint",
    "sharding",
]
