"""The privacy ledger: an immutable record of the mechanisms composed so far.

Every DP-SGD step is one Poisson-subsampled Gaussian mechanism, described by its noise multiplier
``sigma`` and sample rate ``q``.  Composition is commutative, so a run is fully described by the
*multiset* of its steps: how many steps were taken at each ``(sigma, q)``.  The ledger stores
exactly that, as :class:`Segment` runs ``(noise_multiplier, sample_rate, steps)`` with one segment
per distinct setting (merged however the steps were interleaved) in a canonical sorted order.
Hence a million-step run is one segment, and two ledgers are equal exactly when they describe the
same composed mechanism.

Some steps spend more than their segment says; the ledger records that as **events**, kept in the
same canonical multiset (:attr:`Ledger.events`, each with its own ``steps`` count):

* :class:`TruncatedPoisson` ``(num_examples, max_batch_size, sample_rate, steps)``: ``steps`` of
  the segments were drawn by truncated Poisson sampling
  (:func:`fundp.sampling.truncated_poisson_batches`), each of which adds
  ``p = P[Binomial(N + 1, q) > max_batch_size]`` to the total variation between the truncated and
  the untruncated run; :func:`fundp.epsilon` adds ``(1 + e^eps) sum(steps p)`` to delta (see
  :mod:`fundp.accounting.truncation`).  It adds no steps of its own (its steps are segments').
* :class:`CorrelatedNoiseSteps` ``(participation, noise_multiplier, sample_rate, charged, steps)``:
  ``steps`` steps of a correlated-noise mechanism (:mod:`fundp.mf`) with that participation
  schema.  ``charged`` steps are those that spend privacy: under cyclic Poisson the first step of
  each pass over the partitions (``t mod b == 0``: one Poisson-subsampled Gaussian ``(sigma, q)``
  each, Choquette-Choo et al. 2023, Thm 4); under single participation / min-separation the first
  step of a run (``t == 0``: the whole run is one Gaussian mechanism, i.e. ``(sigma, 1)``).  The
  other steps are counted in :attr:`Ledger.steps` and spend nothing more.
* :class:`ScheduledCorrelatedNoiseStep` ``(participation, min_sep, max_participations, step,
  noise_multiplier, column_norm, count_noise_multiplier, steps)``: step ``t = step`` of a
  single-participation / min-separation correlated-noise run whose noise multiplier is a
  schedule ``sigma_t`` (one event per step, recorded in O(1) amortised).  The whole run is one
  Gaussian mechanism (see :meth:`fundp.mf.CorrelatedNoise.account`) with
  ``mu^2 = max_S sum_{t in S} x_t``, ``x_t = (column_norm_t / sigma_t)^2 + count_noise_multiplier^-2``
  (the last term only with a count, i.e. ``count_noise_multiplier > 0``) over the sets ``S`` of
  at most ``max_participations`` recorded steps pairwise ``>= min_sep`` apart;
  :func:`fundp.epsilon` composes it as one ``(1 / mu, 1)`` step.

:func:`accountant_step` (and :meth:`Ledger.record` for events) is the only way a ledger grows.  It
is pure, cheap and works on plain Python numbers, so calling it from a ``torch.compile``-d
training step never puts accounting into the traced graph (``fundp.dp_step`` also fences it off
with ``torch.compiler.disable``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, NamedTuple

from fundp.accounting import _checks

__all__ = ["CorrelatedNoiseSteps", "Ledger", "ScheduledCorrelatedNoiseStep", "Segment", "TruncatedPoisson", "accountant_step"]

_FORMAT = "fundp.Ledger/1"  # segments only (what every ledger without events still writes)
_FORMAT_EVENTS = "fundp.Ledger/2"  # segments and events
_PARTICIPATIONS = ("cyclic_poisson", "min_separation", "single_participation")


class Segment(NamedTuple):
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism with noise multiplier
    ``noise_multiplier`` (noise std / clipping norm) and sample rate ``sample_rate``.

    Example:
      >>> from fundp.accounting import Ledger, Segment
      >>> Ledger([Segment(noise_multiplier=1.0, sample_rate=0.01, steps=10)]).steps
      10
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


class TruncatedPoisson(NamedTuple):
    """``steps`` steps whose Poisson batches (rate ``sample_rate`` over ``num_examples``) were
    truncated at ``max_batch_size``; each adds :attr:`truncation_probability` to the total
    variation distance from the untruncated run (an event: the steps themselves are segments).

    Example:
      >>> from fundp.accounting import TruncatedPoisson
      >>> TruncatedPoisson(num_examples=9, max_batch_size=9, sample_rate=0.5, steps=1).truncation_probability
      0.0009765625
    """

    num_examples: int
    max_batch_size: int
    sample_rate: float
    steps: int

    @property
    def truncation_probability(self) -> float:
        """``p = P[Binomial(num_examples + 1, sample_rate) > max_batch_size]``, per step."""
        return _truncation_probability(self.num_examples, self.max_batch_size, self.sample_rate)


class CorrelatedNoiseSteps(NamedTuple):
    """``steps`` steps of a correlated-noise mechanism (:mod:`fundp.mf`) at ``noise_multiplier``.

    ``participation`` is ``"cyclic_poisson"`` (``sample_rate`` = the partitions' rate),
    ``"min_separation"`` or ``"single_participation"`` (``sample_rate`` 1.0).  ``charged`` steps
    spend one ``(noise_multiplier, sample_rate)`` Poisson-subsampled Gaussian each (for the latter
    two: one Gaussian mechanism per run); uncharged ones spend nothing more (see the module
    docstring).  Every step counts in :attr:`Ledger.steps`.

    Example:
      >>> from fundp.accounting import CorrelatedNoiseSteps, Ledger
      >>> Ledger(events=[CorrelatedNoiseSteps("single_participation", 2.0, 1.0, True, 1),
      ...                CorrelatedNoiseSteps("single_participation", 2.0, 1.0, False, 9)]).steps
      10
    """

    participation: str
    noise_multiplier: float
    sample_rate: float
    charged: bool
    steps: int


class ScheduledCorrelatedNoiseStep(NamedTuple):
    """Step ``step`` of a single-participation / min-separation correlated-noise run with a noise schedule.

    ``noise_multiplier`` is that step's ``sigma_t`` (a data-independent function of the step);
    ``column_norm`` is ``||C[:, t]|| / sens(C)`` (the step's column of the strategy over the
    mechanism's sensitivity); ``count_noise_multiplier`` the std ``sigma_b`` of an adaptive
    clipping count released on the same batch, or 0.0 when none is; ``min_sep`` and
    ``max_participations`` the participation schema (1 and 1 for single participation).  A run's
    steps together are one Gaussian mechanism with ``mu^2 = max_S sum_{t in S} x_t``, ``x_t =
    (column_norm / noise_multiplier)^2 + count_noise_multiplier^-2`` (see the module docstring).
    ``steps`` is 1 (a step recorded twice is refused by :func:`fundp.epsilon`).

    Example:
      >>> from fundp.accounting import Ledger, ScheduledCorrelatedNoiseStep
      >>> event = ScheduledCorrelatedNoiseStep("single_participation", 1, 1, 0, 2.0, 1.0, 0.0, 1)
      >>> Ledger(events=[event, event._replace(step=1, noise_multiplier=1.5)]).steps
      2
    """

    participation: str
    min_sep: int
    max_participations: int
    step: int
    noise_multiplier: float
    column_norm: float
    count_noise_multiplier: float
    steps: int


_EVENTS: dict[str, Any] = {"correlated_noise": CorrelatedNoiseSteps, "truncated_poisson": TruncatedPoisson,
                           "scheduled_correlated_noise": ScheduledCorrelatedNoiseStep}
_KIND = {cls: kind for kind, cls in _EVENTS.items()}
# does an event's count add to Ledger.steps?
_COUNTS_STEPS = {"correlated_noise": True, "truncated_poisson": False, "scheduled_correlated_noise": True}


def _truncation_probability(num_examples: int, max_batch_size: int, sample_rate: float) -> float:
    if max_batch_size >= num_examples + 1:
        return 0.0
    from scipy import stats  # type: ignore[import-untyped]

    return float(stats.binom.sf(max_batch_size, num_examples + 1, sample_rate))


def _event_key(event: Any, name: str) -> tuple[tuple, int]:
    """``(key, steps)`` of a validated event; ``key = (kind, *fields without steps)``."""
    kind = _KIND.get(type(event))
    if kind is None:
        raise TypeError(f"{name} must be a fundp.accounting.TruncatedPoisson, CorrelatedNoiseSteps or "
                        f"ScheduledCorrelatedNoiseStep, got {event!r}")
    count = _checks.steps(event.steps, f"{name}.steps")
    if kind == "scheduled_correlated_noise":
        return _scheduled_key(event, name), count
    if kind == "truncated_poisson":
        from fundp._validate import check_int

        n = check_int(f"{name}.num_examples", event.num_examples, minimum=1)
        b = check_int(f"{name}.max_batch_size", event.max_batch_size, minimum=1)
        return (kind, n, b, _checks.sample_rate(event.sample_rate, f"{name}.sample_rate")), count
    if event.participation not in _PARTICIPATIONS:
        raise ValueError(f"{name}.participation must be one of {_PARTICIPATIONS}, got {event.participation!r}")
    if not isinstance(event.charged, bool):
        raise TypeError(f"{name}.charged must be a bool, got {event.charged!r}")
    q = _checks.sample_rate(event.sample_rate, f"{name}.sample_rate")
    if event.participation != "cyclic_poisson" and q != 1.0:
        raise ValueError(f"{name}.sample_rate must be 1.0 for {event.participation} (no amplification), got {q}")
    sigma = _checks.noise_multiplier(event.noise_multiplier, f"{name}.noise_multiplier")
    return (kind, event.participation, sigma, q, event.charged), count


def _scheduled_key(event: Any, name: str) -> tuple:
    from fundp._validate import check_int, check_nonnegative

    if event.participation not in _PARTICIPATIONS[1:]:
        raise ValueError(f"{name}.participation must be one of {_PARTICIPATIONS[1:]} (a noise schedule with cyclic "
                         f"Poisson amplification is not accounted), got {event.participation!r}")
    b = check_int(f"{name}.min_sep", event.min_sep, minimum=1)
    k = check_int(f"{name}.max_participations", event.max_participations, minimum=1)
    if event.participation == "single_participation" and (b, k) != (1, 1):
        raise ValueError(f"{name}: single_participation has min_sep = max_participations = 1, got {(b, k)}")
    t = check_int(f"{name}.step", event.step, minimum=0)
    sigma = _checks.noise_multiplier(event.noise_multiplier, f"{name}.noise_multiplier")
    r = check_nonnegative(f"{name}.column_norm", event.column_norm)
    sigma_b = check_nonnegative(f"{name}.count_noise_multiplier", event.count_noise_multiplier)
    return ("scheduled_correlated_noise", event.participation, b, k, t, sigma, r, sigma_b)


def _split(counts: dict) -> tuple[tuple[Segment, ...], tuple[Any, ...]]:
    """The canonical value of a counts map: sorted segments, and events sorted by ``(kind, fields)``."""
    segments, events = [], []
    for key, count in counts.items():
        if len(key) == 2:
            segments.append((key, count))
        else:
            events.append((key, count))
    return (
        tuple(Segment(sigma, q, count) for (sigma, q), count in sorted(segments)),
        tuple(_EVENTS[key[0]](*key[1:], count) for key, count in sorted(events)),
    )


def _counts_of(value: tuple[tuple[Segment, ...], tuple[Any, ...]]) -> dict:
    segments, events = value
    counts: dict = {(s.noise_multiplier, s.sample_rate): s.steps for s in segments}
    for event in events:
        counts[(_KIND[type(event)], *event[:-1])] = event.steps
    return counts


def _steps_of(counts: dict) -> int:
    return sum(count for key, count in counts.items() if len(key) == 2 or _COUNTS_STEPS[key[0]])


def _canonical(segments: Iterable[Any], events: Iterable[Any]) -> dict:
    merged: dict = {}
    for index, segment in enumerate(segments):
        try:
            sigma, q, count = segment
        except (TypeError, ValueError):
            raise TypeError(
                f"segments[{index}] must be a (noise_multiplier, sample_rate, steps) triple, got {segment!r}"
            ) from None
        sigma = _checks.noise_multiplier(sigma, f"segments[{index}].noise_multiplier")
        q = _checks.sample_rate(q, f"segments[{index}].sample_rate")
        count = _checks.steps(count, f"segments[{index}].steps")
        if count:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + count
    for index, event in enumerate(events):
        key, count = _event_key(event, f"events[{index}]")
        if count:
            merged[key] = merged.get(key, 0) + count
    return merged


class Ledger:
    """An immutable, hashable record of composed mechanisms: segments and events.

    ``Ledger()`` is the empty ledger (nothing spent: epsilon 0).  ``Ledger(segments)`` accepts any
    iterable of ``(noise_multiplier, sample_rate, steps)`` triples, ``events=`` any iterable of
    :class:`TruncatedPoisson` / :class:`CorrelatedNoiseSteps` / :class:`ScheduledCorrelatedNoiseStep`; repeated settings are merged and
    zero-step entries dropped.  Serialise with :meth:`to_dict` / :meth:`from_dict` (plain
    JSON-compatible dicts; floats round-trip exactly) or :meth:`to_json` / :meth:`from_json`.

    Representation (an implementation detail; the value is the sorted multiset of segments and
    events): a persistent map with Baker's trick, so :func:`accountant_step` is O(1) amortised.
    The newest ledger of a run owns a mutable ``{key: steps}`` dict; appending adds to that dict,
    hands it to the new ledger and leaves the old one a *diff* ``(newer ledger, entries)``: its
    value is the newer one's minus those entries.  Reading an old ledger's :attr:`segments` walks
    its diffs to the owner once (then cached); appending to an old ledger (a branch) copies its
    counts first.  No ledger's value ever changes; :attr:`steps` is a running total.  A 10^5-step
    run with a distinct sigma per step records in well under a second.

    Example:
      >>> from fundp.accounting import Ledger, accountant_step
      >>> ledger = accountant_step(Ledger(), noise_multiplier=1.1, sample_rate=0.01, steps=10**6)
      >>> accountant_step(ledger, noise_multiplier=1.1, sample_rate=0.01).segments
      (Segment(noise_multiplier=1.1, sample_rate=0.01, steps=1000001),)
      >>> Ledger.from_json(ledger.to_json()) == ledger
      True
    """

    __slots__ = ("_value", "_store", "_next", "_delta", "_steps", "_hash", "_consumed", "__weakref__")
    _value: tuple[tuple[Segment, ...], tuple[Any, ...]] | None  # cached canonical value (valid forever once set)
    _store: "_Store | None"  # set on the ledger that owns the run's counts
    _next: "Ledger | None"  # otherwise: the newer ledger this one is a diff of ...
    _delta: tuple[tuple[Any, int], ...] | None  # ... and the entries it lacks
    _steps: int
    _hash: int | None
    _consumed: bool  # set by a step that recorded a step on it (fundp.guards); not part of the value

    def __init__(self, segments: Iterable[Any] = (), events: Iterable[Any] = ()):
        counts = _canonical(segments, events)
        _init(self, _split(counts), None, _steps_of(counts))

    @classmethod
    def _child(cls, parent: "Ledger", entries: tuple[tuple[Any, int], ...], steps: int) -> "Ledger":
        """``parent`` plus validated ``entries`` (``(key, count)`` pairs; ``steps`` of them count
        as steps), in O(1) amortised."""
        store = parent._store
        if store is None or store.owner is not parent:
            store = _Store(_counts_of(parent._materialise()))  # a branch: copy
            owned_by_parent = False
        else:
            owned_by_parent = True
        counts = store.counts
        for key, count in entries:
            counts[key] = counts.get(key, 0) + count
        child = object.__new__(cls)
        _init(child, None, store, parent._steps + steps)
        store.owner = child
        if owned_by_parent:
            set_ = object.__setattr__
            set_(parent, "_store", None)
            set_(parent, "_next", child)
            set_(parent, "_delta", entries)
        return child

    def _materialise(self) -> tuple[tuple[Segment, ...], tuple[Any, ...]]:
        value = self._value
        if value is not None:
            return value
        deltas = []
        node: Ledger = self
        while node._store is None:  # iterative: the diffs of an old ledger may be many
            if node._value is not None:
                break
            assert node._next is not None and node._delta is not None
            deltas.append(node._delta)
            node = node._next
        if node._store is not None:
            counts = dict(node._store.counts)
        else:
            counts = _counts_of(node._value)  # type: ignore[arg-type]
        for entries in deltas:
            for key, count in entries:
                left = counts[key] - count
                if left:
                    counts[key] = left
                else:
                    del counts[key]
        value = _split(counts)
        object.__setattr__(self, "_value", value)
        return value

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The distinct settings and their step counts, sorted by ``(noise_multiplier, sample_rate)``."""
        return self._materialise()[0]

    @property
    def events(self) -> tuple[Any, ...]:
        """The recorded events (:class:`~fundp.accounting.TruncatedPoisson`,
        :class:`~fundp.accounting.CorrelatedNoiseSteps`, :class:`~fundp.accounting.ScheduledCorrelatedNoiseStep`),
        sorted by kind and fields."""
        return self._materialise()[1]

    @property
    def steps(self) -> int:
        """Total number of steps composed, the segments' steps and the correlated-noise steps (read in O(1))."""
        return self._steps

    def record(self, *events: Any) -> "Ledger":
        """Returns this ledger with ``events`` (and nothing else) added, in O(1) amortised per event.

        Example:
          >>> from fundp.accounting import Ledger, TruncatedPoisson
          >>> Ledger([(1.0, 0.5, 1)]).record(TruncatedPoisson(10, 9, 0.5, 1)).events
          (TruncatedPoisson(num_examples=10, max_batch_size=9, sample_rate=0.5, steps=1),)
        """
        entries, steps = [], 0
        for index, event in enumerate(events):
            key, count = _event_key(event, f"events[{index}]")
            if count:
                entries.append((key, count))
                steps += count if _COUNTS_STEPS[key[0]] else 0
        return Ledger._child(self, tuple(entries), steps) if entries else self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Ledger is immutable: use fundp.accountant_step to get a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Ledger is immutable")

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Ledger):
            return NotImplemented
        if self is other:
            return True
        return self._steps == other._steps and self._materialise() == other._materialise()

    def __hash__(self) -> int:
        cached = self._hash
        if cached is None:
            segments, events = self._materialise()
            cached = hash((Ledger, segments)) if not events else hash((Ledger, segments, events))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __bool__(self) -> bool:
        return True  # a ledger is a value; an empty one is still a ledger, not "no ledger"

    def __repr__(self) -> str:
        inner = ", ".join(f"({s.noise_multiplier!r}, {s.sample_rate!r}, {s.steps!r})" for s in self.segments)
        if not self.events:
            return f"Ledger([{inner}])"
        return f"Ledger([{inner}], events={list(self.events)!r})"

    def __reduce__(self):
        return (Ledger, (self.segments, self.events))

    def to_dict(self) -> dict:
        """A JSON-compatible dict: ``{"format": ..., "segments": [{"noise_multiplier", "sample_rate", "steps"}, ...]}``,
        and ``"events": [{"kind", ...fields}, ...]`` when there are events (format ``fundp.Ledger/2``)."""
        segments = [segment._asdict() for segment in self.segments]
        if not self.events:
            return {"format": _FORMAT, "segments": segments}
        events = [{"kind": _KIND[type(event)], **event._asdict()} for event in self.events]
        return {"format": _FORMAT_EVENTS, "segments": segments, "events": events}

    @classmethod
    def from_dict(cls, data: Any) -> "Ledger":
        """Inverse of :meth:`to_dict`; validates every entry (reads both formats)."""
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise ValueError("a ledger dict needs a 'segments' list (as written by Ledger.to_dict)")
        form = data.get("format", _FORMAT)
        if form not in (_FORMAT, _FORMAT_EVENTS):
            raise ValueError(f"unknown ledger format {form!r}, expected {_FORMAT!r} or {_FORMAT_EVENTS!r}")
        unexpected = set(data) - {"format", "segments"} - ({"events"} if form == _FORMAT_EVENTS else set())
        if unexpected:
            raise ValueError(f"unexpected keys {sorted(unexpected)} in a {form!r} ledger dict (events need {_FORMAT_EVENTS!r})")
        triples = []
        for index, entry in enumerate(data["segments"]):
            if not isinstance(entry, dict) or set(entry) != set(Segment._fields):
                raise ValueError(f"segments[{index}] must be a dict with keys {Segment._fields}, got {entry!r}")
            triples.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
        raw_events = data.get("events", [])
        if not isinstance(raw_events, list):
            raise ValueError("a ledger dict's 'events' must be a list")
        events = []
        for index, entry in enumerate(raw_events):
            kind = entry.get("kind") if isinstance(entry, dict) else None
            event_type = _EVENTS.get(kind)  # type: ignore[arg-type]
            if event_type is None or set(entry) != {"kind", *event_type._fields}:
                raise ValueError(f"events[{index}] must be a dict with a known 'kind' ({sorted(_EVENTS)}) and its fields, got {entry!r}")
            events.append(event_type(**{field: entry[field] for field in event_type._fields}))
        return cls(triples, events)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Ledger":
        return cls.from_dict(json.loads(text))


class _Store:
    """The mutable counts of one line of a run, owned by its newest ledger (see :class:`Ledger`)."""

    __slots__ = ("counts", "owner")

    def __init__(self, counts: dict):
        self.counts = counts
        self.owner: Ledger | None = None


def _init(ledger: Ledger, value: Any, store: Any, steps: int) -> None:
    set_ = object.__setattr__
    set_(ledger, "_value", value)
    set_(ledger, "_store", store)
    set_(ledger, "_next", None)
    set_(ledger, "_delta", None)
    set_(ledger, "_steps", steps)
    set_(ledger, "_hash", None)
    set_(ledger, "_consumed", False)


def _truncation_of(truncation: Any, sample_rate: float) -> tuple:
    """The event key of ``truncation`` (a ``(num_examples, max_batch_size)`` pair or a truncated
    Poisson sampler, whose rate must be ``sample_rate``)."""
    from fundp._validate import check_int

    if hasattr(truncation, "max_batch_size") and hasattr(truncation, "num_examples"):
        rate = getattr(truncation, "sample_rate", sample_rate)
        if not math.isclose(float(rate), sample_rate, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(f"truncation is a sampler at sample_rate={rate}, but the step records sample_rate={sample_rate}")
        n, b = truncation.num_examples, truncation.max_batch_size
    else:
        try:
            n, b = truncation
        except (TypeError, ValueError):
            raise TypeError(
                f"truncation must be a (num_examples, max_batch_size) pair or a truncated Poisson sampler, got {truncation!r}"
            ) from None
    n = check_int("truncation.num_examples", n, minimum=1)
    b = check_int("truncation.max_batch_size", b, minimum=1)
    return ("truncated_poisson", n, b, sample_rate)


def accountant_step(ledger: Ledger, *, noise_multiplier: float, sample_rate: float, steps: int = 1,
                    truncation: Any = None) -> Ledger:
    """Returns ``ledger`` with ``steps`` more Poisson-subsampled Gaussian steps composed.

    Pure and cheap: O(1) amortised, whatever the ledger's length or number of distinct settings
    (no privacy computation happens here; :func:`fundp.accounting.epsilon` does that on demand).  Inputs are converted to plain Python numbers and validated; ``steps=0``
    returns ``ledger`` itself.

    Args:
      ledger: the :class:`Ledger` so far (``Ledger()`` to start).
      noise_multiplier: sigma, the Gaussian noise std divided by the L2 clipping norm; > 0.
      sample_rate: q, the Poisson sampling probability of each example; in (0, 1].
      steps: how many steps at this setting; >= 0.
      truncation: ``None``, or the steps' Poisson batches were truncated: a
        ``(num_examples, max_batch_size)`` pair or the
        :func:`~fundp.sampling.truncated_poisson_batches` sampler itself.  Also records the
        :class:`TruncatedPoisson` event, so :func:`~fundp.accounting.epsilon` adds the truncation term.

    Example:
      >>> import fundp
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=100)
      >>> ledger.segments
      (Segment(noise_multiplier=1.0, sample_rate=0.01, steps=100),)
      >>> truncated = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, truncation=(1000, 40))
      >>> truncated.events
      (TruncatedPoisson(num_examples=1000, max_batch_size=40, sample_rate=0.01, steps=1),)
    """
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
    sigma = _checks.noise_multiplier(noise_multiplier)
    q = _checks.sample_rate(sample_rate)
    count = _checks.steps(steps)
    if truncation is not None:
        key = _truncation_of(truncation, q)
        if count == 0:
            return ledger
        return Ledger._child(ledger, (((sigma, q), count), (key, count)), count)
    if count == 0:
        return ledger
    return Ledger._child(ledger, (((sigma, q), count),), count)
