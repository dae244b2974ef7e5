"""Correlated-noise mechanisms as values: ``init`` / ``sample`` with the state passed in and out.

A :class:`CorrelatedNoise` couples a strategy ``C`` (:mod:`fundp.mf.strategies`) with the
participation pattern of the run (:mod:`fundp.mf.accounting`).  At step ``t`` it adds to the
clipped gradient sum

    noise_t = stddev * sens(C) * (C^{-1} Z)_t,     Z_t ~ N(0, I) drawn from the step's key,

where ``stddev = noise_multiplier * clip_norm`` is what DP-SGD would add and ``sens(C)`` the
sensitivity of ``C`` under the declared participation.  Scaling by ``sens(C)`` keeps the usual
meaning of the noise multiplier: the released ``C G + stddev sens(C) Z`` is a Gaussian mechanism
with noise multiplier ``sigma`` relative to its sensitivity ``sens(C) clip_norm``.  With
``C = I`` and single participation (or cyclic Poisson with one partition) the noise is exactly
DP-SGD's, draw for draw: ``sample`` then returns ``fundp.noise.noise_like(like, key, stddev)``.

``Z_t`` is one stream of standard normals drawn from ``key`` exactly as
:func:`fundp.noise.noise_like` draws it (float64, cut into the leaves in optree order), so the
caller must pass a fresh key every step, as for DP-SGD (``fold_in(key, t)`` or a split).  The
recurrences run in float64; the buffers are stored in ``state_dtype`` (default: float64 for
float64 parameters, else float32).

**Noise schedules** (``dp_step``'s per-call ``noise_multiplier``, ``train_step``'s schedule
``sigma_t``): ``sample`` scales the draw *after* the recurrence, so step ``t`` adds
``sigma_t S sens(C) (C^{-1} Z)_t`` (``S`` the clip norm) and the run releases, in units of
``S sens(C)``, ``Y = X + D C^{-1} Z`` with ``D = diag(sigma_t)``.  ``C D^{-1}`` is invertible, so
``Y`` is a post-processing of ``C D^{-1} Y = C D^{-1} X + Z``: the Gaussian mechanism of the
column-scaled strategy ``C D^{-1}``, whose sensitivity for an example joining the steps of ``S``
is ``max ||sum_{t in S} C[:, t] g_t / sigma_t|| / sens(C)`` over ``||g_t|| <= 1`` (the
:mod:`fundp.mf.sensitivity` of ``C`` with column weights ``1 / sigma_t``).  This needs ``D``
fixed in advance: the schedule must be a data-independent function of the step (not of released
values).  Since ``C`` and ``C^{-1}`` are lower-triangular, the first ``T`` released steps depend on
``sigma_0 .. sigma_{T-1}`` only, and the columns ``t < T`` bound their sensitivity; a constant
schedule gives ``1 / sigma`` again.  Accounted for single participation (any strategy:
``mu = max_t ||C[:, t]|| / (sens(C) sigma_t)``) and for min-separation with a banded strategy
(columns ``min_sep`` apart orthogonal: ``mu^2 = max_S sum_{t in S} ||C[:, t]||^2 / (sens(C)
sigma_t)^2``, exact); refused for min-separation with a non-banded strategy (the weighted Gram
matrix would be needed) and for cyclic Poisson (the amplification argument charges one step per
pass at one sigma, not a worst partition of a schedule).  See :meth:`CorrelatedNoise.account`.

The state is a :class:`NoiseState` pytree of tensors (``step``: 0-d int64; ``buffers``: like the
parameters with a leading ``[m]`` axis), so ``torch.compile`` traces it and
:func:`fundp.checkpoint.save` stores it, e.g. inside ``opt_state=(opt_state, noise_state)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import optree
import torch

from fundp import random as fundp_random
from fundp.noise import standard_normal_chunks
from fundp._validate import check_delta, check_int, check_nonnegative, check_positive
from fundp.mf import accounting as mf_accounting
from fundp.mf.accounting import CyclicPoisson, MinSeparation, Participation, SingleParticipation
from fundp.mf.sensitivity import sensitivity as dense_sensitivity
from fundp.mf.sensitivity import column_norms, max_participation_sum, toeplitz_sensitivity
from fundp.mf.strategies import BandedMatrix, BandedToeplitz, BufferedToeplitz, Strategy, TreeAggregation

__all__ = ["NoiseState", "CorrelatedNoise", "mechanism", "mf_noise", "mechanism_epsilon", "calibrate_mechanism_noise", "AmplifiedBanded", "amplified_banded"]


class NoiseState(NamedTuple):
    """State of a correlated-noise mechanism: a pytree of tensors.

    Example:
      >>> import torch, fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.banded_toeplitz([1.0, 0.5], 8), fundp.mf.min_separation(4))
      >>> mech.init({"w": torch.zeros(3)})
      NoiseState(step=tensor(0), buffers={'w': tensor([[0., 0., 0.]])})
    """

    step: torch.Tensor
    """0-d int64: how many noise vectors were drawn so far (``t`` of the next draw)."""
    buffers: Any
    """Pytree like the parameters, each leaf ``[m, *param.shape]`` (``m`` = ``strategy.num_buffers``)."""


_MAX_DENSE = 4096  # largest n whose generic sensitivity is computed with dense n x n matrices


def _strategy_sensitivity(strategy: Strategy, participation: Participation) -> float:
    n = strategy.n
    bands = strategy.bands
    if isinstance(participation, CyclicPoisson):
        if bands is None:
            raise ValueError(
                f"cyclic_poisson amplification needs a banded strategy (banded_toeplitz / banded / identity), "
                f"got {type(strategy).__name__}"
            )
        if bands > participation.num_partitions:
            raise ValueError(
                f"bands ({bands}) must be <= num_partitions ({participation.num_partitions}) for cyclic Poisson "
                "amplification (Choquette-Choo et al. 2023, Thm 4)"
            )
    if isinstance(participation, MinSeparation):
        if bands is not None and bands > participation.min_sep:
            raise ValueError(
                f"bands ({bands}) must be <= min_sep ({participation.min_sep}) for a banded strategy "
                "(columns min_sep apart must be orthogonal); use fewer bands"
            )
        if isinstance(strategy, (BandedToeplitz, BandedMatrix)):
            # at most min_sep bands: the allowed columns are orthogonal, the sensitivity is exact
            if isinstance(strategy, BandedToeplitz):
                norms2 = _toeplitz_column_norms2(strategy)
            else:
                norms2 = column_norms(strategy.matrix()) ** 2
            return math.sqrt(max_participation_sum(norms2, participation.min_sep, participation.max_participations))
        if isinstance(strategy, BufferedToeplitz):
            return toeplitz_sensitivity(
                strategy.toeplitz_coefs(), n, min_sep=participation.min_sep,
                max_participations=participation.max_participations,
            )
        if n > _MAX_DENSE:
            raise ValueError(
                f"the min-sep sensitivity of {type(strategy).__name__} is computed densely (n x n); n = {n} is over "
                f"{_MAX_DENSE}: use a banded or BLT strategy for long multi-epoch runs"
            )
        return dense_sensitivity(
            strategy.matrix(), min_sep=participation.min_sep, max_participations=participation.max_participations
        )
    # single participation, or cyclic Poisson: the largest column norm
    if isinstance(strategy, TreeAggregation):
        return math.sqrt(strategy.levels)  # step 1 lies in the nodes ending at 1, 2, 4, ..., 2^(levels-1)
    if isinstance(strategy, BandedToeplitz):
        return math.sqrt(float(_toeplitz_column_norms2(strategy).max()))
    coefs = strategy.toeplitz_coefs()
    if coefs is not None:
        return float(math.sqrt(coefs @ coefs))
    return float(column_norms(strategy.matrix()).max())


def _toeplitz_column_norms2(strategy: BandedToeplitz) -> Any:
    import numpy as np

    squares = strategy.coefs**2
    n = strategy.n
    # column j holds c_0 .. c_{min(b, n - j) - 1}
    cumulative = np.cumsum(squares)
    lengths = np.minimum(strategy.bands, n - np.arange(n))
    return cumulative[lengths - 1]


def _stddev(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise TypeError(f"stddev must be a number or a 0-d floating-point tensor, got {value.dtype} {tuple(value.shape)}")
        return value.reshape(()).to(torch.float64)
    return check_nonnegative("stddev", value)


class CorrelatedNoise:
    """A correlated-noise mechanism: strategy ``C`` + participation, with ``init`` and ``sample``.

    Build it with :func:`fundp.mf.mechanism`.  Attributes: ``strategy``, ``participation``,
    ``sensitivity`` (``sens(C)``, a float fixed at construction), ``state_dtype``, ``steps``
    (``n``, the horizon ``sens(C)`` was computed for; drawing more than ``n`` noise vectors is not
    covered by the guarantee).

    Example:
      >>> import fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.tree(8), fundp.mf.single_participation())
      >>> type(mech).__name__, mech.steps, round(mech.sensitivity ** 2, 9)  # 4 tree levels
      ('CorrelatedNoise', 8, 4.0)
    """

    def __init__(self, strategy: Strategy, participation: Participation, *, state_dtype: torch.dtype | None = None):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a fundp.mf strategy (identity, banded_toeplitz, ...), got {type(strategy).__name__}")
        self.strategy = strategy
        self.participation = mf_accounting.check_participation(participation)
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.sensitivity = _strategy_sensitivity(strategy, self.participation)
        self.steps = strategy.n

    def __repr__(self) -> str:
        return f"CorrelatedNoise({self.strategy!r}, {self.participation!r}, sensitivity={self.sensitivity:.6g})"

    def schedule_refusal(self) -> str | None:
        """Why a noise schedule (a per-step ``sigma_t``) is not accounted for this mechanism, or ``None`` if it is.

        Accounted: single participation (any strategy) and min-separation with a banded strategy
        (the module docstring derives the mechanism ``C D^{-1} X + Z``).

        Example:
          >>> import fundp
          >>> fundp.mf.mechanism(fundp.mf.tree(8), fundp.mf.single_participation()).schedule_refusal() is None
          True
        """
        participation = self.participation
        if isinstance(participation, CyclicPoisson):
            return "cyclic Poisson: the amplification argument charges one step per pass at one sigma"
        if isinstance(participation, MinSeparation) and not isinstance(self.strategy, (BandedToeplitz, BandedMatrix)):
            return (f"min_separation with a non-banded {type(self.strategy).__name__}: the sensitivity of the "
                    "column-scaled strategy would need its whole weighted Gram matrix")
        if not isinstance(self.strategy, (BandedToeplitz, BandedMatrix)) and self.strategy.toeplitz_coefs() is None \
                and self.steps > _MAX_DENSE:
            return f"its column norms are computed densely (n x n); n = {self.steps} is over {_MAX_DENSE}"
        return None

    def _column_ratios(self) -> Any:
        """``||C[:, t]|| / sens(C)`` for every step ``t`` (float64 NumPy ``[n]``, computed once)."""
        cached = getattr(self, "_ratios", None)
        if cached is not None:
            return cached
        import numpy as np

        strategy = self.strategy
        coefs = strategy.toeplitz_coefs()
        if isinstance(strategy, BandedToeplitz):
            norms2 = _toeplitz_column_norms2(strategy)
        elif coefs is not None and not isinstance(strategy, BandedMatrix):
            # column t of a Toeplitz C holds c_0 .. c_{n-1-t}
            norms2 = np.cumsum(np.asarray(coefs, dtype=np.float64) ** 2)[::-1][: self.steps]
        else:
            norms2 = column_norms(strategy.matrix()) ** 2
        self._ratios = np.sqrt(norms2) / self.sensitivity
        return self._ratios

    def _buffer_dtype(self, leaf: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float64 if leaf.dtype == torch.float64 else torch.float32

    def init(self, params: Any) -> NoiseState:
        """The state before step 0: ``step = 0`` and zero buffers ``[m, *leaf.shape]`` per leaf.

        Example:
          >>> import torch, fundp
          >>> mech = fundp.mf.mechanism(fundp.mf.tree(8), fundp.mf.single_participation())
          >>> state = mech.init({"w": torch.zeros(3)})
          >>> int(state.step), tuple(state.buffers["w"].shape)
          (0, (4, 3))
        """
        leaves = optree.tree_leaves(params)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
                raise TypeError(f"params must hold floating-point tensors, got {getattr(leaf, 'dtype', type(leaf))}")
        device = leaves[0].device if leaves else None
        buffers = optree.tree_map(self._init_leaf, params)
        return NoiseState(torch.zeros((), dtype=torch.int64, device=device), buffers)

    def _init_leaf(self, leaf: Any) -> Any:
        """Zero buffers ``[m, *leaf.shape]``; for a sharded (DTensor) leaf only the rank's own block
        ``[m, *local_shape]``, as a DTensor laid out like the leaf (:func:`fundp.sharding.stacked_shard`)."""
        from fundp.sharding import is_sharded, stacked_shard

        if not is_sharded(leaf):
            return self.strategy.init_buffers(leaf.detach(), self._buffer_dtype(leaf))
        return stacked_shard(leaf, self.strategy.init_buffers(leaf.detach().to_local(), self._buffer_dtype(leaf)))

    def sample(self, state: NoiseState, key: torch.Tensor, stddev: Any, like: Any) -> tuple[Any, NoiseState]:
        """``(noise, new_state)``: ``noise = stddev * sensitivity * (C^{-1} Z)_t`` shaped and typed like ``like``.

        ``stddev`` is the std DP-SGD would use, ``noise_multiplier * clip_norm`` (a number >= 0
        or a 0-d tensor); ``t = state.step``; ``Z_t`` comes from ``key`` as in
        :func:`fundp.noise.noise_like`.  Pure: same inputs, same outputs.  In eager mode a step
        ``t >= n`` raises ``ValueError`` (the guarantee covers ``n`` steps); a compiled graph
        skips that check (it would read the step back from the device).

        Example:
          >>> import torch, fundp
          >>> from fundp.noise import noise_like
          >>> mech = fundp.mf.mechanism(fundp.mf.identity(4), fundp.mf.single_participation())
          >>> g = {"w": torch.zeros(3)}
          >>> key = fundp.random.key(0)
          >>> noise, state = mech.sample(mech.init(g), key, 2.0, g)
          >>> bool(torch.equal(noise["w"], noise_like(g, key, 2.0)["w"])), int(state.step)
          (True, 1)
        """
        fundp_random._check_key(key)
        scale = _stddev(stddev) * self.sensitivity
        if not torch.compiler.is_compiling() and int(state.step) >= self.steps:
            # (eager only: reading the step syncs with the device; a compiled graph skips the check)
            raise ValueError(
                f"state.step = {int(state.step)}: this mechanism was built for n = {self.steps} steps, and its "
                "sensitivity (so the privacy guarantee) covers no more; build it with a larger n"
            )
        leaves, treedef = optree.tree_flatten(like)
        buffers: list[Any] = treedef.flatten_up_to(state.buffers)
        if not leaves:
            return like, NoiseState(state.step + 1, state.buffers)
        def draw(buffer: torch.Tensor, chunk: torch.Tensor, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, updated = self.strategy.next(buffer, chunk, state.step)
            return (x * scale).to(device=leaf.device, dtype=leaf.dtype), updated

        from fundp.sharding import on_local_blocks

        noises, new_buffers = [], []
        # Sharded (DTensor) leaves: each rank draws and updates its own coordinates only.
        for chunk, leaf, buffer in zip(standard_normal_chunks(leaves, key), leaves, buffers):
            noise, updated = on_local_blocks(draw, buffer, chunk, leaf)
            noises.append(noise)
            new_buffers.append(updated)
        return (
            optree.tree_unflatten(treedef, noises),
            NoiseState(state.step + 1, optree.tree_unflatten(treedef, new_buffers)),
        )

    # ------------------------------------------------------------------ accounting

    def ledger(self, noise_multiplier: float) -> Any:
        """The :class:`fundp.Ledger` of the whole ``n``-step run at ``noise_multiplier``: :meth:`account` of steps ``[0, n)``.

        Example:
          >>> import fundp
          >>> mech = fundp.mf.mechanism(fundp.mf.identity(10), fundp.mf.cyclic_poisson(1, 0.01))
          >>> ledger = mech.ledger(1.0)
          >>> ledger.steps, ledger.events[0]
          (10, CorrelatedNoiseSteps(participation='cyclic_poisson', noise_multiplier=1.0, sample_rate=0.01, charged=True, steps=10))
          >>> fundp.epsilon(ledger, 1e-5) == fundp.epsilon(fundp.Ledger([(1.0, 0.01, 10)]), 1e-5)
          True
        """
        from fundp.accounting import Ledger

        return self.account(Ledger(), noise_multiplier=noise_multiplier, steps=self.steps)

    def max_participations(self) -> int:
        """The most steps of the ``n``-step run one example joins: 1 (single participation),
        ``max_participations`` or ``ceil(n / min_sep)`` (min-separation), ``ceil(n / b)`` (cyclic Poisson).

        Example:
          >>> import fundp
          >>> fundp.mf.mechanism(fundp.mf.identity(10), fundp.mf.min_separation(4)).max_participations()
          3
        """
        participation = self.participation
        if isinstance(participation, SingleParticipation):
            return 1
        if isinstance(participation, MinSeparation):
            most = -(-self.steps // participation.min_sep)
            return most if participation.max_participations is None else min(most, participation.max_participations)
        return -(-self.steps // participation.num_partitions)

    def account(self, ledger: Any, *, noise_multiplier: float, step: int | None = None, steps: int | None = None,
                adaptive_clipping: Any = None, scheduled: bool = False) -> Any:
        """Returns ``ledger`` with steps ``[step, step + steps)`` of this mechanism recorded as
        :class:`~fundp.accounting.CorrelatedNoiseSteps` events (all of them count in ``ledger.steps``).

        Either ``step`` (one step, index ``step``) or ``steps`` (the first ``steps`` from 0); steps
        past the horizon ``n`` are refused (the sensitivity covers no more).  The *charged* steps
        spend privacy: under cyclic Poisson with ``b`` partitions each ``t`` with ``t mod b == 0``
        is one ``(sigma, q)`` Poisson-subsampled Gaussian (``ceil(T / b)`` after ``T`` steps, the
        most any example joins; Choquette-Choo et al. 2023, Thm 4); under single participation /
        min-sep the whole run is one Gaussian mechanism, charged at ``t = 0`` as ``(sigma, 1)``.
        :func:`fundp.epsilon` composes them with whatever else the ledger holds (the MF run's
        dominating mechanism composes like any other, also interleaved: concurrent composition,
        Vadhan & Zhang 2023).  ``noise_multiplier = 0`` is refused.

        ``adaptive_clipping``: the :class:`fundp.adaptive.QuantileClipping` whose noisy unclipped
        count (sensitivity 1, std ``sigma_b``) is released at every step too.  Single / min-sep:
        each example joins at most ``k`` = :meth:`max_participations` steps, so the counts are a
        Gaussian mechanism with ``mu^2 = k / sigma_b^2`` and the run with them one with
        ``mu^2 = 1 / sigma^2 + k / sigma_b^2``: recorded at noise multiplier
        :func:`fundp.adaptive.ledger_noise_multiplier` ``(cfg, sigma, num_counts=k)``.  Cyclic
        Poisson: refused (its amplification argument does not cover the count).

        ``scheduled=True``: ``noise_multiplier`` is this step's ``sigma_t`` of a noise schedule
        (a data-independent function of the step; the module docstring derives the mechanism
        ``C D^{-1} X + Z``).  Each step is recorded as a
        :class:`~fundp.accounting.ScheduledCorrelatedNoiseStep` carrying ``sigma_t`` and
        ``||C[:, t]|| / sens(C)`` (and ``sigma_b`` with adaptive clipping), and
        :func:`fundp.epsilon` charges the run one Gaussian mechanism with ``mu^2 = max_S sum_{t in
        S} (||C[:, t]|| / (sens(C) sigma_t))^2 + |S| / sigma_b^2`` over the allowed sets ``S`` of
        recorded steps (exact: single participation, or min-separation with a banded strategy,
        whose columns ``min_sep`` apart are orthogonal, as are the counts').  A constant schedule
        over the whole run gives ``mu = 1 / sigma`` again (and with a count at most today's
        ``sqrt(1 / sigma^2 + k / sigma_b^2)``).  Refused where :meth:`schedule_refusal` says why.
        Every step of a run must then be recorded with ``scheduled=True``.

        Example:
          >>> import fundp
          >>> mech = fundp.mf.mechanism(fundp.mf.identity(8), fundp.mf.cyclic_poisson(4, 0.1))
          >>> ledger = fundp.Ledger()
          >>> for t in range(8):
          ...     ledger = mech.account(ledger, noise_multiplier=1.0, step=t)
          >>> ledger.steps, [(event.charged, event.steps) for event in ledger.events]
          (8, [(False, 6), (True, 2)])
        """
        sigma = check_positive("noise_multiplier", noise_multiplier)
        if (step is None) == (steps is None):
            raise ValueError("pass exactly one of step (one step) or steps (the first steps steps)")
        if step is not None:
            start = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
            count = 1
        else:
            start, count = 0, int(steps)  # type: ignore[arg-type]
        if start < 0 or count < 0:
            raise ValueError("step and steps must be >= 0")
        if start + count > self.steps:
            raise ValueError(
                f"steps up to {start + count} recorded, but this mechanism was built for n = {self.steps} steps and "
                "its sensitivity (so the privacy guarantee) covers no more; build it with a larger n"
            )
        participation = self.participation
        if scheduled:
            return self._account_scheduled(ledger, sigma, start, count, adaptive_clipping)
        if adaptive_clipping is not None:
            if isinstance(participation, CyclicPoisson):
                raise NotImplementedError(
                    "adaptive clipping with a cyclic-Poisson correlated-noise mechanism is not accounted: the "
                    "amplification argument (Choquette-Choo et al. 2023, Thm 4) does not cover the noisy count; "
                    "use single_participation / min_separation, or a fixed clipping norm")
            from fundp.adaptive import ledger_noise_multiplier

            sigma = ledger_noise_multiplier(adaptive_clipping, sigma, num_counts=self.max_participations())
        from fundp.accounting import CorrelatedNoiseSteps, Ledger

        if not isinstance(ledger, Ledger):
            raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
        if isinstance(participation, CyclicPoisson):
            b = participation.num_partitions
            charged = -(-(start + count) // b) - (-(-start // b))  # multiples of b in [start, start + count)
            name, rate = "cyclic_poisson", participation.sample_rate
        else:
            charged = 1 if start == 0 and count > 0 else 0
            name = "single_participation" if isinstance(participation, SingleParticipation) else "min_separation"
            rate = 1.0
        return ledger.record(CorrelatedNoiseSteps(name, sigma, rate, True, charged),
                             CorrelatedNoiseSteps(name, sigma, rate, False, count - charged))

    def _account_scheduled(self, ledger: Any, sigma: float, start: int, count: int, adaptive_clipping: Any) -> Any:
        """Steps ``[start, start + count)`` at ``sigma`` as :class:`~fundp.accounting.ScheduledCorrelatedNoiseStep` events."""
        from fundp.accounting import Ledger, ScheduledCorrelatedNoiseStep

        if not isinstance(ledger, Ledger):
            raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
        why = self.schedule_refusal()
        if why is not None:
            from fundp.guards import refusal

            raise refusal(("noise_mechanism", "noise_multiplier (per call)"), why)
        sigma_b = 0.0
        if adaptive_clipping is not None:
            from fundp.adaptive import _count_noise

            sigma_b = float(_count_noise(adaptive_clipping, 1))
        participation = self.participation
        if isinstance(participation, MinSeparation):
            name, b, k = "min_separation", participation.min_sep, self.max_participations()
        else:
            name, b, k = "single_participation", 1, 1
        ratios = self._column_ratios()
        return ledger.record(*(ScheduledCorrelatedNoiseStep(name, b, k, t, sigma, float(ratios[t]), sigma_b, 1)
                               for t in range(start, start + count)))

    def epsilon(self, noise_multiplier: float, delta: float, *, accountant: str = "prv") -> float:
        """Epsilon of the whole ``n``-step run (see :func:`fundp.mf.mechanism_epsilon`)."""
        return mechanism_epsilon(self, noise_multiplier=noise_multiplier, delta=delta, accountant=accountant)


def mechanism(strategy: Strategy, participation: Participation, *, state_dtype: torch.dtype | None = None) -> CorrelatedNoise:
    """The correlated-noise mechanism of ``strategy`` under ``participation``.

    Raises ``ValueError`` when the pair has no guarantee here: a banded strategy with more bands
    than ``min_sep`` (min-sep) or than ``num_partitions`` (cyclic Poisson), or a non-banded
    strategy (tree, BLT) with cyclic Poisson.

    Example:
      >>> import fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.tree(16), fundp.mf.single_participation())
      >>> round(mech.sensitivity ** 2, 9)  # 5 tree levels
      5.0
    """
    return CorrelatedNoise(strategy, participation, state_dtype=state_dtype)


def mf_noise(tree: Any, state: NoiseState, key: torch.Tensor, stddev: Any, mechanism: CorrelatedNoise) -> tuple[Any, NoiseState]:
    """``(tree + noise, new_state)``: correlated noise for a hand-written loop (no ``dp_step``).

    ``tree`` is the clipped gradient *sum* of step ``state.step``; ``stddev`` is
    ``noise_multiplier * clip_norm``.  Divide by the expected batch size afterwards, as DP-SGD does.

    Example:
      >>> import torch, fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.optimize_banded_toeplitz(16, 4), fundp.mf.min_separation(4))
      >>> grads = {"w": torch.zeros(2)}
      >>> state = mech.init(grads)
      >>> for t in range(3):
      ...     noisy, state = fundp.mf.mf_noise(grads, state, fundp.random.fold_in(fundp.random.key(0), t), 1.0, mech)
      >>> int(state.step)
      3
    """
    noise, new_state = mechanism.sample(state, key, stddev, tree)
    return optree.tree_map(torch.add, tree, noise), new_state


def mechanism_epsilon(mechanism: CorrelatedNoise, *, noise_multiplier: float, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the ``n``-step run of ``mechanism`` at ``noise_multiplier`` and ``delta``.

    Single participation / min-sep: the exact epsilon of the Gaussian mechanism with
    ``mu = 1 / noise_multiplier`` (closed form, ``accountant`` unused).  Cyclic Poisson:
    ``fundp.accounting.epsilon`` of DP-SGD with ``(noise_multiplier, sample_rate)`` over
    ``ceil(n / b)`` steps, with the given ``accountant`` (``"prv"`` or ``"rdp"``); at sample rate 1
    (no amplification) the exact Gaussian mechanism with ``mu = sqrt(ceil(n / b)) / sigma``.
    ``noise_multiplier = 0`` gives ``inf``.

    The ledger a step records (``dp_step(..., noise_mechanism=mechanism)``, :meth:`CorrelatedNoise.account`)
    gives the same: after the whole run ``fundp.epsilon(ledger, delta)`` equals this (exactly under
    amplification, where this *is* that ledger's epsilon; within the ledger's 1e-9 closed-form
    margin, above, for the Gaussian participations).

    Example:
      >>> import fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.tree(64), fundp.mf.single_participation())
      >>> round(fundp.mf.mechanism_epsilon(mech, noise_multiplier=1.0, delta=1e-5), 4)
      4.3772
    """
    if not isinstance(mechanism, CorrelatedNoise):
        raise TypeError(f"mechanism must be a fundp.mf.CorrelatedNoise, got {type(mechanism).__name__}")
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    delta = check_delta(delta)
    if sigma == 0:
        return math.inf
    if isinstance(mechanism.participation, (SingleParticipation, MinSeparation)):
        return mf_accounting.gaussian_epsilon(1.0 / sigma, delta)
    if mechanism.participation.sample_rate == 1.0:
        # no amplification: T Gaussian mechanisms compose exactly into one with mu = sqrt(T) / sigma
        steps = -(-mechanism.steps // mechanism.participation.num_partitions)
        return mf_accounting.gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    from fundp.accounting import epsilon as ledger_epsilon

    return float(ledger_epsilon(mechanism.ledger(sigma), delta, accountant=accountant))


def calibrate_mechanism_noise(mechanism: CorrelatedNoise, *, target_epsilon: float, delta: float, accountant: str = "prv") -> float:
    """Smallest noise multiplier whose :func:`mechanism_epsilon` is ``<= target_epsilon``.

    Gaussian participations: ``1 / mu`` with ``mu`` the largest meeting the target (closed form
    and root finding).  Cyclic Poisson: :func:`fundp.calibrate_noise` with ``steps = ceil(n / b)``.

    Example:
      >>> import fundp
      >>> mech = fundp.mf.mechanism(fundp.mf.identity(10), fundp.mf.single_participation())
      >>> sigma = fundp.mf.calibrate_mechanism_noise(mech, target_epsilon=2.0, delta=1e-5)
      >>> round(fundp.mf.mechanism_epsilon(mech, noise_multiplier=sigma, delta=1e-5), 6)
      2.0
    """
    if not isinstance(mechanism, CorrelatedNoise):
        raise TypeError(f"mechanism must be a fundp.mf.CorrelatedNoise, got {type(mechanism).__name__}")
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    participation = mechanism.participation
    if isinstance(participation, CyclicPoisson):
        steps = -(-mechanism.steps // participation.num_partitions)
        return _calibrate_cyclic(target, delta, participation.sample_rate, steps, accountant)
    return 1.0 / mf_accounting._gaussian_mu_for(target, delta)


def epsilon(mechanism: CorrelatedNoise, **kwargs: Any) -> float:
    """Deprecated name of :func:`mechanism_epsilon` (``fundp.epsilon`` takes a ledger)."""
    import warnings

    warnings.warn("fundp.mf.epsilon is deprecated: use fundp.mf.mechanism_epsilon (fundp.epsilon takes a ledger, "
                  "e.g. mechanism.ledger(sigma))", DeprecationWarning, stacklevel=2)
    return mechanism_epsilon(mechanism, **kwargs)


def calibrate_noise(mechanism: CorrelatedNoise, **kwargs: Any) -> float:
    """Deprecated name of :func:`calibrate_mechanism_noise` (``fundp.calibrate_noise`` takes a sample rate)."""
    import warnings

    warnings.warn("fundp.mf.calibrate_noise is deprecated: use fundp.mf.calibrate_mechanism_noise",
                  DeprecationWarning, stacklevel=2)
    return calibrate_mechanism_noise(mechanism, **kwargs)


def _calibrate_cyclic(target: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest sigma for ``steps`` Poisson-subsampled Gaussian steps at ``sample_rate`` (closed form at rate 1)."""
    if sample_rate == 1.0:
        return math.sqrt(steps) / mf_accounting._gaussian_mu_for(target, delta)
    from fundp.accounting import calibrate_noise as ledger_calibrate

    return float(ledger_calibrate(target, delta, sample_rate=sample_rate, steps=steps, accountant=accountant))


class AmplifiedBanded(NamedTuple):
    """What :func:`amplified_banded` chose.

    Example:
      >>> import fundp
      >>> choice = fundp.mf.amplified_banded(8, num_examples=100, expected_batch_size=10,
      ...                                    target_epsilon=8.0, delta=1e-6, candidates=[1, 2])
      >>> choice.bands, choice.sample_rate, sorted(choice.losses)
      (2, 0.2, [1, 2])
    """

    mechanism: CorrelatedNoise
    """The banded mechanism under ``cyclic_poisson(bands, q)``."""
    noise_multiplier: float
    """The smallest ``sigma`` meeting the target with ``ceil(n / bands)`` amplified steps."""
    bands: int
    """The number of bands (= partitions) chosen."""
    sample_rate: float
    """``q = expected_batch_size * bands / num_examples``."""
    losses: dict
    """``{bands: sigma^2 * prefix_loss}`` for every candidate (lower is better)."""


def amplified_banded(
    n: int,
    *,
    num_examples: int,
    expected_batch_size: float,
    target_epsilon: float,
    delta: float,
    candidates: Sequence[int] | None = None,
    objective: str = "mean",
    accountant: str = "prv",
) -> AmplifiedBanded:
    """Banded MF with cyclic Poisson sampling: the number of bands that trades amplification best.

    For each candidate ``b`` (default: the powers of two up to ``num_examples /
    expected_batch_size``, and that maximum): sample rate ``q_b = expected_batch_size b / N``,
    noise multiplier ``sigma_b`` from :func:`fundp.calibrate_noise` over ``ceil(n / b)`` steps
    (Choquette-Choo et al. 2023, Thm 4), strategy :func:`fundp.mf.optimize_banded_toeplitz`
    ``(n, b)``; the expected squared error of the running sums is ``sigma_b^2 prefix_loss_b`` (times
    ``clip^2``), and the smallest wins (JAX-Privacy's ``optimize_coefs_for_amplifications`` does
    the same).  Few bands win at small epsilon (amplification), many at large epsilon.

    Example:
      >>> import fundp
      >>> choice = fundp.mf.amplified_banded(64, num_examples=1000, expected_batch_size=125,
      ...                                    target_epsilon=8.0, delta=1e-6, candidates=[1, 8])
      >>> choice.bands, choice.mechanism.participation
      (8, cyclic_poisson(8, sample_rate=1.0))
    """
    from fundp.mf.optimize import optimize_banded_toeplitz, prefix_loss
    from fundp.mf.strategies import BandedToeplitz as _BandedToeplitz

    n = check_int("n", n, minimum=1)
    num_examples = check_int("num_examples", num_examples, minimum=1)
    batch = check_positive("expected_batch_size", expected_batch_size)
    if batch > num_examples:
        raise ValueError(f"expected_batch_size must be <= num_examples = {num_examples}, got {batch}")
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    max_bands = max(1, min(n, int(num_examples // batch)))
    if candidates is None:
        powers = [1 << k for k in range(max_bands.bit_length()) if 1 << k <= max_bands]
        candidates = sorted(set(powers) | {max_bands})
    chosen = sorted({check_int("candidates", b, minimum=1, maximum=max_bands) for b in candidates})
    if not chosen:
        raise ValueError("candidates must hold at least one number of bands")
    best: tuple[float, int, float, Any] | None = None
    losses = {}
    for b in chosen:
        q = min(1.0, batch * b / num_examples)
        sigma = _calibrate_cyclic(target, delta, q, -(-n // b), accountant)
        strategy: _BandedToeplitz = optimize_banded_toeplitz(n, b, objective=objective)
        loss = sigma**2 * prefix_loss(strategy, objective)
        losses[b] = loss
        if best is None or loss < best[0]:
            best = (loss, b, sigma, strategy)
    assert best is not None
    _, b, sigma, strategy = best
    q = min(1.0, batch * b / num_examples)
    return AmplifiedBanded(CorrelatedNoise(strategy, CyclicPoisson(b, q)), sigma, b, q, losses)
