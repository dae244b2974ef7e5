"""Privatizers: the noise half of a DP step as one value each.

A :class:`Privatizer` turns a clipped sum (whose L2 sensitivity ``S`` it is told) into a noisy
one and says which privacy **event** it spent doing so:

    state = privatizer.init(params)
    noisy_sum, state, event = privatizer.privatize(clipped_sum, S, key, state)

* :func:`gaussian_privatizer` — i.i.d. ``N(0, (sigma S)^2)`` drawn from ``key``
  (:func:`fundp.noise.noise_like`); event :class:`GaussianQuery` ``(sigma)``.
* :func:`secure_gaussian_privatizer` — the same distribution from OS entropy with the hardened
  sampler (:func:`fundp.secure.secure_noise`; ``key`` unused); same event.
* :func:`correlated_privatizer` — a correlated-noise mechanism (:mod:`fundp.mf`):
  ``sigma S sens(C) (C^{-1} Z)_t`` (:meth:`fundp.mf.CorrelatedNoise.sample`), its state a
  :class:`fundp.mf.NoiseState`; event :class:`CorrelatedNoiseQuery` ``(mechanism, sigma, t)``.
  With ``C = I`` it is :func:`gaussian_privatizer` draw for draw.
* :func:`quantile_privatizer` — adaptive clipping's noisy unclipped count (Andrew et al. 2021;
  :mod:`fundp.adaptive`), sensitivity 1: its "clipped sum" is ``(norms, mask)``, its state the
  :class:`fundp.adaptive.QuantileClipState`; event :class:`QuantileCountQuery` ``(cfg)``.

Events are descriptions, not ledger entries: a Gaussian query's event does not know how the
batch was sampled.  :func:`record` turns the events released on one batch into ledger entries
with the sampler's rate: the queries of one Poisson batch compose into *one* subsampled Gaussian
(``z_eff = (sum_j z_j^-2)^(-1/2)``, :func:`fundp.adaptive.ledger_noise_multiplier`), a correlated
query records its participation schema (:meth:`fundp.mf.CorrelatedNoise.account`).  Noise
multipliers may be 0-d tensors (schedules under ``torch.compile``); :func:`record` reads them on
the host, outside any graph.

The noise functions are those of :mod:`fundp.noise`, :mod:`fundp.secure`, :mod:`fundp.mf` and
:mod:`fundp.adaptive`; this module only assembles them.  Noisy sums stay in float64 (not yet
divided by the expected batch size nor rounded): :func:`fundp.dp_step` does both, once.

Example:
  >>> import torch, fundp
  >>> from fundp.privatizers import gaussian_privatizer
  >>> p = gaussian_privatizer(1.0)
  >>> noisy, state, event = p.privatize({"w": torch.zeros(2, dtype=torch.float64)}, 0.0, fundp.random.key(0), p.init(None))
  >>> noisy["w"], state, event
  (tensor([0., 0.], dtype=torch.float64), None, GaussianQuery(noise_multiplier=1.0))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from fundp import adaptive
from fundp._validate import check_nonnegative
from fundp.clipping import is_threshold_tensor
from fundp.noise import noise_like
from fundp.types import ClippedSum

__all__ = [
    "Privatizer",
    "GaussianQuery",
    "CorrelatedNoiseQuery",
    "QuantileCountQuery",
    "gaussian_privatizer",
    "secure_gaussian_privatizer",
    "correlated_privatizer",
    "quantile_privatizer",
    "record",
]

_SUM_DTYPE = torch.float64


# --------------------------------------------------------------------------- events


class GaussianQuery(NamedTuple):
    """One Gaussian query on the batch: noise std / L2 sensitivity = ``noise_multiplier``.

    Recorded by :func:`record` as one Poisson-subsampled Gaussian step at the sampler's rate.

    Example:
      >>> from fundp.privatizers import GaussianQuery
      >>> GaussianQuery(1.1).noise_multiplier
      1.1
    """

    noise_multiplier: Any
    """``sigma``: a number >= 0 or a 0-d tensor (read on the host when recorded)."""


class CorrelatedNoiseQuery(NamedTuple):
    """Step ``step`` of a correlated-noise mechanism (:mod:`fundp.mf`) at ``noise_multiplier``.

    Recorded by :func:`record` with the mechanism's participation schema
    (:meth:`fundp.mf.CorrelatedNoise.account`).

    Example:
      >>> import fundp
      >>> from fundp.privatizers import CorrelatedNoiseQuery
      >>> mech = fundp.mf.mechanism(fundp.mf.identity(4), fundp.mf.single_participation())
      >>> CorrelatedNoiseQuery(mech, 1.0, 0).step
      0
    """

    mechanism: Any
    """The :class:`fundp.mf.CorrelatedNoise` that drew the noise."""
    noise_multiplier: Any
    """``sigma``: a number > 0 or a 0-d tensor."""
    step: Any
    """``t``, the index of the draw (an int or a 0-d int64 tensor: ``NoiseState.step`` before it)."""
    scheduled: bool = False
    """``noise_multiplier`` came per call (a schedule ``sigma_t``; ``dp_step`` sets it): recorded with
    ``account(..., scheduled=True)``."""


class QuantileCountQuery(NamedTuple):
    """Adaptive clipping's noisy unclipped count (sensitivity 1, std ``cfg.count_noise_multiplier``).

    Released on the same batch as the gradient sum, it composes with the gradient's query into
    one mechanism (:func:`fundp.adaptive.ledger_noise_multiplier`): :func:`record` never records
    it alone.

    Example:
      >>> from fundp import adaptive
      >>> from fundp.privatizers import QuantileCountQuery
      >>> QuantileCountQuery(adaptive.quantile_clipping(count_noise_multiplier=4.0)).cfg.count_noise_multiplier
      4.0
    """

    cfg: Any
    """The :class:`fundp.adaptive.QuantileClipping` whose count was released."""


# --------------------------------------------------------------------------- the value


class Privatizer(NamedTuple):
    """The noise half of a DP step: ``init(params) -> state`` and
    ``privatize(clipped_sum, sensitivity, key, state, *, noise_multiplier=None) -> (noisy_sum, state, event)``.

    ``event(state, *, noise_multiplier=None)`` is the event ``privatize`` will return, computed
    without the data (a step records it before touching the batch, so an over-budget step is
    refused first).  ``noise_multiplier`` is the built ``sigma`` (``None`` for the count query);
    the keyword of ``privatize`` / ``event`` overrides it per call (schedules).

    Example:
      >>> from fundp.privatizers import gaussian_privatizer
      >>> p = gaussian_privatizer(0.5)
      >>> p.name, p.noise_multiplier, p.event(None)
      ('gaussian', 0.5, GaussianQuery(noise_multiplier=0.5))
    """

    name: str
    """``"gaussian"``, ``"secure_gaussian"``, ``"correlated"`` or ``"quantile_count"``."""
    init: Callable[..., Any]
    """``init(params) -> state`` (the count query: ``init(initial_max_norm)``)."""
    privatize: Callable[..., tuple]
    """``privatize(clipped_sum, sensitivity, key, state, *, noise_multiplier=None) -> (noisy_sum, state, event)``."""
    event: Callable[..., Any]
    """``event(state, *, noise_multiplier=None) -> event``: what ``privatize`` spends, without the data."""
    noise_multiplier: Any = None
    """The built ``sigma``."""


def _sigma(built: Any, override: Any) -> Any:
    value = built if override is None else override
    return value if is_threshold_tensor(value) else check_nonnegative("noise_multiplier", value)


def round_to(tree: Any, dtypes: Any) -> Any:
    """``tree``'s leaves rounded to ``dtypes`` (a tuple in leaf order; ``None``: kept).

    Example:
      >>> import torch
      >>> from fundp.privatizers import round_to
      >>> round_to({"w": torch.ones(1, dtype=torch.float64)}, (torch.float32,))["w"].dtype
      torch.float32
    """
    if dtypes is None:
        return tree
    leaves, spec = optree.tree_flatten(tree)
    return optree.tree_unflatten(spec, [leaf if d is None else leaf.to(d) for leaf, d in zip(leaves, dtypes)])


def _wide(tree: Any) -> Any:
    return optree.tree_map(lambda g: g.to(_SUM_DTYPE), tree)


def _grads_of(clipped_sum: Any) -> Any:
    """The gradient tree of a :class:`fundp.ClippedSum` (or the tree itself)."""
    return clipped_sum.grads if isinstance(clipped_sum, ClippedSum) else clipped_sum


def gaussian_privatizer(noise_multiplier: Any) -> Privatizer:
    """i.i.d. Gaussian noise: ``noisy = sum + N(0, (sigma S)^2)``, drawn from ``key`` in float64.

    ``clipped_sum`` is a gradient tree or a :class:`fundp.ClippedSum` (its ``grads``); the noise
    is :func:`fundp.noise.noise_like` of the float64 sum at std ``sigma * sensitivity``.  The
    state is ``None``.  Event: :class:`GaussianQuery` ``(sigma)``.

    Example:
      >>> import torch, fundp
      >>> from fundp.noise import noise_like
      >>> from fundp.privatizers import gaussian_privatizer
      >>> g, key = {"w": torch.zeros(3, dtype=torch.float64)}, fundp.random.key(0)
      >>> noisy, _, _ = gaussian_privatizer(2.0).privatize(g, 0.5, key, None)
      >>> bool(torch.equal(noisy["w"], noise_like(g, key, 1.0)["w"]))
      True
    """
    built = _sigma(noise_multiplier, None)

    def event(state: Any, *, noise_multiplier: Any = None) -> GaussianQuery:
        return GaussianQuery(_sigma(built, noise_multiplier))

    def privatize(clipped_sum: Any, sensitivity: Any, key: torch.Tensor, state: Any = None, *,
                  noise_multiplier: Any = None) -> tuple:
        spent = event(state, noise_multiplier=noise_multiplier)
        wide = _wide(_grads_of(clipped_sum))
        noisy = optree.tree_map(torch.add, wide, noise_like(wide, key, spent.noise_multiplier * sensitivity))
        return noisy, state, spent

    return Privatizer("gaussian", lambda params: None, privatize, event, built)


def secure_gaussian_privatizer(noise_multiplier: Any) -> Privatizer:
    """:func:`gaussian_privatizer` with secure-mode noise (:func:`fundp.secure.secure_noise`: OS
    entropy, hardened sampler, float64); ``key`` is not used.  Same event.

    Example:
      >>> import torch
      >>> from fundp.privatizers import secure_gaussian_privatizer
      >>> noisy, _, event = secure_gaussian_privatizer(1.0).privatize({"w": torch.zeros(2)}, 0.0, None, None)
      >>> noisy["w"], event
      (tensor([0., 0.], dtype=torch.float64), GaussianQuery(noise_multiplier=1.0))
    """
    iid = gaussian_privatizer(noise_multiplier)

    def privatize(clipped_sum: Any, sensitivity: Any, key: Any, state: Any = None, *, noise_multiplier: Any = None) -> tuple:
        from fundp.secure import secure_noise

        spent = iid.event(state, noise_multiplier=noise_multiplier)
        # release_dtypes: float64 leaves are snapped to the secure grid; leaves released in a
        # coarser dtype keep their one rounding to it (no floating-point attack there).
        # Sharded (DTensor) sums: each rank draws the noise of its own block only (map_local).
        from fundp.sharding import map_local

        stddev, dtypes = float(spent.noise_multiplier * sensitivity), getattr(clipped_sum, "dtypes", None)
        noisy = map_local(lambda wide: secure_noise(wide, stddev, release_dtypes=dtypes), _wide(_grads_of(clipped_sum)))
        return noisy, state, spent

    return iid._replace(name="secure_gaussian", privatize=privatize)


def correlated_privatizer(mechanism: Any, noise_multiplier: Any) -> Privatizer:
    """Correlated noise of a :mod:`fundp.mf` mechanism: ``noisy = sum + sigma S sens(C) (C^{-1} Z)_t``.

    ``init(params)`` is ``mechanism.init(params)``; ``privatize`` draws with
    ``mechanism.sample(state, key, sigma * sensitivity, like)``, ``like`` the sum rounded to the
    parameters' dtypes (a :class:`fundp.ClippedSum`'s ``dtypes``; a plain tree as it is), and
    adds the draw to the float64 sum.  Event: :class:`CorrelatedNoiseQuery` ``(mechanism, sigma,
    state.step)``.  ``sigma = 0`` is refused when recorded (no finite privacy).

    Example:
      >>> import torch, fundp
      >>> from fundp.privatizers import correlated_privatizer, gaussian_privatizer
      >>> mech = fundp.mf.mechanism(fundp.mf.identity(4), fundp.mf.single_participation())
      >>> p, g, key = correlated_privatizer(mech, 1.0), {"w": torch.zeros(3, dtype=torch.float64)}, fundp.random.key(0)
      >>> noisy, state, event = p.privatize(g, 1.0, key, p.init(g))
      >>> bool(torch.equal(noisy["w"], gaussian_privatizer(1.0).privatize(g, 1.0, key, None)[0]["w"])), int(event.step)
      (True, 0)
    """
    if not (callable(getattr(mechanism, "init", None)) and callable(getattr(mechanism, "sample", None))):
        raise TypeError("noise_mechanism must have init(params) -> state and sample(state, key, stddev, like) -> (noise, state)")
    built = _sigma(noise_multiplier, None)

    def event(state: Any, *, noise_multiplier: Any = None) -> CorrelatedNoiseQuery:
        return CorrelatedNoiseQuery(mechanism, _sigma(built, noise_multiplier), getattr(state, "step", None))

    def privatize(clipped_sum: Any, sensitivity: Any, key: torch.Tensor, state: Any, *, noise_multiplier: Any = None) -> tuple:
        spent = event(state, noise_multiplier=noise_multiplier)
        grads = _grads_of(clipped_sum)
        like = round_to(grads, getattr(clipped_sum, "dtypes", None))
        draws, new_state = mechanism.sample(state, key, spent.noise_multiplier * sensitivity, like)
        wide = _wide(grads)
        return optree.tree_map(lambda g, z: g + z.to(g.dtype), wide, draws), new_state, spent

    return Privatizer("correlated", mechanism.init, privatize, event, built)


def quantile_privatizer(cfg: Any, expected_batch_size: Any, *, reduce_count: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Privatizer:
    """Adaptive clipping's count query (:mod:`fundp.adaptive`) as a privatizer of sensitivity 1.

    ``init(initial_max_norm)`` is ``cfg.init``; ``privatize((norms, mask), 1, key, state)``
    releases :func:`fundp.adaptive.noisy_unclipped_count` of ``norms`` (real rows: ``mask``) at
    the state's threshold and returns ``(noisy_count, update(cfg, state, noisy_count,
    expected_batch_size), QuantileCountQuery(cfg))``.  Its event composes with the gradient's
    (:func:`record`).

    ``reduce_count`` (``distributed=True``): sums the exact int64 unclipped count of this rank's
    rows over the ranks (:func:`fundp.distributed.all_reduce_sum`) *before* the noise, which is
    then added once, from the key every rank shares: every rank releases the same noisy count,
    and so keeps the same clip state, equal to one process's on the whole batch bit for bit.

    Example:
      >>> import torch, fundp
      >>> from fundp import adaptive
      >>> from fundp.privatizers import quantile_privatizer
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=0.0)
      >>> p = quantile_privatizer(cfg, 2.0)
      >>> count, state, event = p.privatize((torch.tensor([0.5, 2.0]), None), 1, fundp.random.key(0), p.init(1.0))
      >>> count, round(float(state.max_norm), 6)
      (tensor(1., dtype=torch.float64), 1.0)
    """
    adaptive._checked(cfg)

    def event(state: Any, *, noise_multiplier: Any = None) -> QuantileCountQuery:
        return QuantileCountQuery(cfg)

    def privatize(query: Any, sensitivity: Any, key: torch.Tensor, state: Any, *, noise_multiplier: Any = None) -> tuple:
        if isinstance(sensitivity, (int, float)) and sensitivity != 1:
            raise ValueError(f"the unclipped count has sensitivity 1, got {sensitivity}")
        norms, mask = query
        count = adaptive.unclipped_count(norms, state.max_norm, mask)
        if reduce_count is not None:
            count = reduce_count(count)
        noisy = adaptive._with_count_noise(count, adaptive._as_threshold(state.max_norm, norms), key.to(norms.device), cfg)
        return noisy, adaptive.update(cfg, state, noisy, expected_batch_size), event(state)

    return Privatizer("quantile_count", cfg.init, privatize, event, None)


# --------------------------------------------------------------------------- events -> ledger


def _host(value: Any) -> float:
    return float(value)


def record(ledger: Any, events: Any, *, sample_rate: float | None = None, truncation: Any = None, budget: Any = None) -> Any:
    """Returns ``ledger`` with the events released on one batch recorded (pure; host side).

    ``events`` is one event or a sequence of them, all released on the same batch:

    * Gaussian queries (at most one) with any number of count queries: one Poisson-subsampled
      Gaussian step at ``sample_rate`` with the composed multiplier (each count folded in by
      :func:`fundp.adaptive.ledger_noise_multiplier`), with ``truncation`` (a truncated Poisson
      sampler) and ``budget`` (:func:`fundp.budget.spend`) as for :func:`fundp.accountant_step`;
    * a :class:`CorrelatedNoiseQuery` (with at most one count query): the mechanism's
      :meth:`~fundp.mf.CorrelatedNoise.account` of step ``t`` (``sample_rate`` unused: the
      participation is the mechanism's; ``truncation`` and ``budget`` refused).

    Example:
      >>> import fundp
      >>> from fundp import adaptive
      >>> from fundp.privatizers import GaussianQuery, QuantileCountQuery, record
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=4.0)
      >>> record(fundp.Ledger(), [GaussianQuery(3.0), QuantileCountQuery(cfg)], sample_rate=0.01).segments
      (Segment(noise_multiplier=2.4, sample_rate=0.01, steps=1),)
    """
    if not isinstance(events, (list, tuple)) or isinstance(events, (GaussianQuery, CorrelatedNoiseQuery, QuantileCountQuery)):
        events = (events,)
    gaussians = [e for e in events if isinstance(e, GaussianQuery)]
    correlated = [e for e in events if isinstance(e, CorrelatedNoiseQuery)]
    counts = [e.cfg for e in events if isinstance(e, QuantileCountQuery)]
    if len(gaussians) + len(correlated) != 1 or len(gaussians) + len(correlated) + len(counts) != len(events):
        raise ValueError(f"record takes one gradient query (Gaussian or correlated) and count queries, got {events!r}")
    if correlated:
        query = correlated[0]
        if truncation is not None:
            raise ValueError("truncated Poisson batches are not a participation schema of a noise_mechanism: "
                             "its ledger cannot account them (use the mechanism's own sampler)")
        if budget is not None:
            from fundp.guards import check_combination

            check_combination({"budget": True, "noise_mechanism": True})
        if len(counts) > 1:
            raise ValueError("a correlated-noise step records at most one count query")
        if not callable(getattr(query.mechanism, "account", None)):
            raise ValueError(
                "this noise_mechanism cannot record its steps in a ledger: it has no account(ledger, ...), "
                "as the fundp.mf mechanisms have; pass ledger=None and account it yourself"
            )
        scheduled = {"scheduled": True} if query.scheduled else {}
        return query.mechanism.account(ledger, noise_multiplier=_host(query.noise_multiplier), step=query.step,
                                       adaptive_clipping=counts[0] if counts else None, **scheduled)
    if sample_rate is None:
        raise ValueError("sample_rate is required to update a ledger: pass dp_step(..., sample_rate=q)")
    sigma = _host(gaussians[0].noise_multiplier)
    if counts:
        for cfg in counts:
            sigma = float(adaptive.ledger_noise_multiplier(cfg, sigma))
    if budget is not None:
        from fundp.budget import spend

        return spend(ledger, noise_multiplier=sigma, sample_rate=sample_rate, budget=budget, truncation=truncation)
    from fundp.accounting import accountant_step

    return accountant_step(ledger, noise_multiplier=sigma, sample_rate=sample_rate, truncation=truncation)
