"""User-level DP: the privacy unit is a person (a user), not one example.

When one user contributes many examples, example-level epsilon says little about that user.  Two
recipes (Chua et al. 2024, "Mind the privacy unit"):

* **ULS** (user-level sampling, this module): every step samples *users* by Poisson sampling with
  rate ``q``, takes at most ``k`` of each sampled user's examples (uniformly, from the step's key),
  and clips each *user's* gradient ``g_u = sum_{i in u} g_i`` (or the mean over the user's
  examples) to ``C``.  Adding or removing one user then moves the clipped sum by at most ``C``:
  the step is a Poisson-sampled Gaussian mechanism over users, accounted by the ledger exactly as
  example-level DP-SGD with ``sample_rate = q`` (users) — and ``fundp.epsilon`` of that ledger is
  user-level epsilon.
* **ELS** (example-level sampling and clipping) with group privacy: a user with at most ``k``
  examples is a group of ``k`` examples; :func:`group_epsilon` converts an example-level ledger
  with the group-privacy lemma (loose; for comparison).

**How the clipping is exact with either engine.**  A user batch puts each user on one row:
every leaf of ``examples`` is ``[U, k, ...]`` (user ``u``'s ``k`` example slots) with
``example_mask: BoolTensor[U, k]`` marking the real examples.  :func:`user_loss` turns an
example-level ``loss_fn(params, batch) -> [n]`` into a user-level one returning ``[U]``: the ``U k``
slots are flattened into one batch of rows, their losses reshaped to ``[U, k]``, padded slots
zeroed with ``torch.where`` (never multiplied, so a NaN cannot leak) and summed (or averaged) per
user.  Since the loss of row ``u`` depends only on user ``u``'s examples, the "per-example"
gradient of row ``u`` *is* ``g_u``, so every engine — ``vmap`` and the ghost engine (a
flattened group of rows ``[U k, ...]`` belongs to its user, like a sequence's tokens) — computes
``||g_u||`` and the clipped sum exactly, or refuses, as it does for examples.  Padding *users*
use the ordinary step ``mask`` (``user_mask``).

Example:
  >>> import torch, fundp
  >>> from fundp.user_level import user_loss
  >>> loss_fn = lambda p, b: b["x"] @ p["w"]                      # gradient of example i: x_i
  >>> batch = {"examples": {"x": torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [9.0, 9.0]]])},
  ...          "example_mask": torch.tensor([[True, True], [True, False]])}
  >>> grads = fundp.per_sample_grads(user_loss(loss_fn))({"w": torch.zeros(2)}, batch)
  >>> grads["w"]                                              # g_u = sum of the user's real x_i
  tensor([[3., 4.],
          [1., 0.]])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Literal

import optree
import torch
from scipy import optimize  # type: ignore[import-untyped]

from fundp import random as fundp_random
from fundp._validate import check_delta, check_int, check_sample_rate

__all__ = ["UserBatches", "group_epsilon", "user_batches", "user_loss"]


def user_loss(loss_fn: Callable[[Any, Any], torch.Tensor], *, reduction: Literal["sum", "mean"] = "sum") -> Callable[[Any, Any], torch.Tensor]:
    """Transform: an example-level ``loss_fn(params, batch) -> [n]`` into a user-level one.

    The returned ``f(params, user_batch) -> [U]`` takes ``user_batch = {"examples": tree,
    "example_mask": BoolTensor[U, k]}`` with every leaf of ``tree`` of shape ``[U, k, ...]`` and
    returns ``L_u = sum_{j: mask[u, j]} loss_j`` (``reduction="sum"``) or that sum divided by the
    user's number of real examples (``"mean"``; 0 for a user with none).  Its gradient for row
    ``u`` is the user's summed (or mean) gradient, which ``dp_step`` then clips as one unit.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

    def per_user_loss(params: Any, user_batch: Any) -> torch.Tensor:
        examples, example_mask = user_batch["examples"], user_batch["example_mask"]
        users, slots = example_mask.shape
        rows = optree.tree_map(lambda leaf: leaf.reshape(users * slots, *leaf.shape[2:]), examples)
        losses = loss_fn(params, rows).reshape(users, slots)
        total = torch.where(example_mask, losses, torch.zeros_like(losses)).sum(dim=1)
        if reduction == "sum":
            return total
        return total / example_mask.sum(dim=1).clamp(min=1).to(total.dtype)

    return per_user_loss


def _check_user_ids(user_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(user_ids)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"user_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"user_ids must be integers, got {ids.dtype}")
    return ids.to(torch.int64).cpu()


class UserBatches:
    """Poisson sampling over users, at most ``k`` examples each, at fixed padded shapes.

    ``user_ids[i]`` is the user of example ``i`` (any integers).  Step ``t`` uses only
    ``fold_in(key, t)``: users join independently with probability ``sample_rate`` (exact
    Bernoulli inclusion), and of a joining user's examples ``min(k, n_u)`` are kept, chosen
    uniformly at random (a random priority per example, smallest ``k`` kept).  Each step is
    ``(example_indices: LongTensor[P, k], example_mask: BoolTensor[P, k], user_mask: BoolTensor[P])``
    with ``P`` the number of sampled users rounded up to ``pad_to_multiple``; padded slots point at
    a real example of the same row (or example 0) and are masked.  Use ``sample_rate`` (of users)
    for the ledger: the epsilon it reports is then user-level.  ``dp_step(..., sampler=batches)``
    reads the rate and ``expected_batch_size`` from it, with users as the privacy unit.
    """

    # Poisson sampling whose units are users: what check_sampling_matches and dp_step read.
    sampling = "poisson"

    def __init__(self, user_ids: Any, sample_rate: float, key: torch.Tensor, *, steps: int,
                 max_examples_per_user: int, pad_to_multiple: int = 8):
        ids = _check_user_ids(user_ids)
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = check_int("steps", steps, minimum=0)
        self.max_examples_per_user = check_int("max_examples_per_user", max_examples_per_user, minimum=1)
        self.pad_to_multiple = check_int("pad_to_multiple", pad_to_multiple, minimum=1)
        fundp_random._check_key(key)
        self._key = key.detach().cpu()
        # Examples grouped by user: order[starts[u]:starts[u] + counts[u]] are user u's examples.
        self.users, inverse, self.counts = torch.unique(ids, return_inverse=True, return_counts=True)
        self._order = torch.argsort(inverse, stable=True)
        self._starts = torch.cumsum(self.counts, 0) - self.counts

    @property
    def num_users(self) -> int:
        return int(self.users.numel())

    @property
    def num_examples(self) -> int:
        """The number of privacy units sampled from: the users."""
        return self.num_users

    @property
    def expected_batch_size(self) -> float:
        """Expected number of sampled users per step, ``q U`` (what a user-level step divides by)."""
        return self.sample_rate * self.num_users

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = check_int("step", step, minimum=0, maximum=max(self.steps - 1, 0))
        from fundp.sampling import poisson_indices  # sampling builds on the step; imported at use

        step_key = fundp_random.fold_in(self._key, step)
        sampled = poisson_indices(self.num_users, self.sample_rate, fundp_random.fold_in(step_key, 0))
        k = self.max_examples_per_user
        counts, starts = self.counts[sampled], self._starts[sampled]
        # Slot j of user u holds that user's example of rank j under a random priority.
        most = int(counts.max()) if sampled.numel() else 0
        priority = fundp_random.uniform(fundp_random.fold_in(step_key, 1), (int(sampled.numel()), max(most, 1)),
                                        dtype=torch.float64)
        slots = torch.arange(max(most, 1))
        exists = slots[None, :] < counts[:, None]
        priority = torch.where(exists, priority, torch.full_like(priority, 2.0))  # missing slots sort last
        ranked = torch.argsort(priority, dim=1, stable=True)[:, :k]
        taken = torch.gather(exists, 1, ranked) if ranked.shape[1] else exists[:, :0]
        positions = starts[:, None] + torch.where(taken, ranked, torch.zeros_like(ranked))
        indices = self._order[positions.clamp(max=self._order.numel() - 1)] if positions.numel() else positions
        width = taken.shape[1]
        if width < k:  # every sampled user has fewer than k examples (or none were sampled)
            indices = torch.cat([indices, indices[:, :1].expand(-1, k - width) if width else
                                 torch.zeros(indices.shape[0], k - width, dtype=torch.long)], dim=1)
            taken = torch.cat([taken, torch.zeros(taken.shape[0], k - width, dtype=torch.bool)], dim=1)
        rows = int(sampled.numel())
        padded = self.pad_to_multiple * max(1, math.ceil(rows / self.pad_to_multiple))
        example_indices = torch.zeros(padded, k, dtype=torch.long)
        example_indices[:rows] = indices
        example_mask = torch.zeros(padded, k, dtype=torch.bool)
        example_mask[:rows] = taken
        user_mask = torch.arange(padded) < rows
        return example_indices, example_mask, user_mask

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batch(step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self.batch(t) for t in range(self.steps))

    def __len__(self) -> int:
        return self.steps

    def gather(self, dataset: Any, example_indices: torch.Tensor, example_mask: torch.Tensor) -> dict[str, Any]:
        """``{"examples": tree of [P, k, ...], "example_mask": [P, k]}`` from a pytree of ``[N, ...]`` tensors."""
        examples = optree.tree_map(lambda leaf: leaf[example_indices.to(leaf.device)], dataset)
        return {"examples": examples, "example_mask": example_mask}


def user_batches(user_ids: Any, sample_rate: float, key: torch.Tensor, *, steps: int, max_examples_per_user: int,
                 pad_to_multiple: int = 8) -> UserBatches:
    """:class:`UserBatches` (Poisson over users, at most ``max_examples_per_user`` each).

    Example:
      >>> import torch, fundp
      >>> from fundp.user_level import user_batches
      >>> batches = user_batches(torch.tensor([0, 0, 0, 1, 2, 2]), 1.0, fundp.random.key(0), steps=1,
      ...                        max_examples_per_user=2, pad_to_multiple=4)
      >>> indices, example_mask, user_mask = batches[0]
      >>> example_mask.tolist(), user_mask.tolist()
      ([[True, True], [True, False], [True, True], [False, False]], [True, True, True, False])
    """
    return UserBatches(user_ids, sample_rate, key, steps=steps, max_examples_per_user=max_examples_per_user,
                       pad_to_multiple=pad_to_multiple)


def group_epsilon(ledger: Any, delta: float, group_size: int, *, accountant: str = "prv") -> float:
    """ELS: epsilon for a group of ``group_size`` examples from an *example-level* ledger (group privacy).

    An ``(eps, d)``-DP mechanism is ``(k eps, k e^{(k-1) eps} d)``-DP for groups of ``k`` (the
    group-privacy lemma, e.g. Vadhan 2017, Lemma 2.2).  Returns ``k eps(d)`` for the example-level
    ``d`` solving ``k e^{(k-1) eps(d)} d = delta`` (root found in ``log d``).  Loose by design: it is
    the comparison point for user-level sampling, not a recommendation.

    Example:
      >>> import fundp
      >>> from fundp.user_level import group_epsilon
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=2.0, sample_rate=0.01, steps=100)
      >>> group_epsilon(ledger, 1e-5, 1) == fundp.epsilon(ledger, 1e-5)
      True
    """
    from fundp.accounting import epsilon

    delta = check_delta(delta)
    k = check_int("group_size", group_size, minimum=1)
    if k == 1:
        return epsilon(ledger, delta, accountant=accountant)

    def excess(log_d: float) -> float:  # log(k e^{(k-1) eps(d)} d) - log(delta): increasing in d
        return math.log(k) + (k - 1) * epsilon(ledger, math.exp(log_d), accountant=accountant) + log_d - math.log(delta)

    hi = math.log(delta) - math.log(k)
    lo = hi - 40.0
    # The example-level delta can be tiny (the lemma multiplies it by k e^{(k-1) eps}): walk down
    # in steps of e^-40 as far as 1e-300 before giving up.
    while excess(lo) > 0:
        if lo < math.log(1e-300):
            raise ValueError(
                f"the group-privacy conversion for a group of {group_size} at delta={delta} needs an "
                "example-level delta below 1e-300: this ledger's group epsilon is too large to be useful"
            )
        hi, lo = lo, lo - 40.0
    log_d = optimize.brentq(excess, lo, hi, xtol=1e-10)
    # Round down to the side where the group's delta is <= delta.
    while excess(log_d) > 0:
        log_d -= 1e-9
    return k * epsilon(ledger, math.exp(log_d), accountant=accountant)
