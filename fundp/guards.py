"""Guards of a DP step: what is refused, why, and the process-wide memory behind the guards.

Two things live here, so that :func:`fundp.dp_step` consults one place:

* :data:`UNSUPPORTED`: the table of refused combinations of ``dp_step`` options, each with the
  reason it is refused (a combination that would break the guarantee is refused at build time,
  before the first step), the sampler's kind among the options (``sampler=shuffled`` with i.i.d.
  noise, plain Poisson batches with a ``noise_mechanism``, ...).  :func:`check_combination` and
  :func:`check_sampler` raise the table's error (:func:`refusal`: an
  :class:`UnsupportedCombination` whose ``.pair`` names the row); a batch whose sampler is known
  at call time (a :class:`fundp.data.Batch`, a tagged mask) is refused by the same rows.
* The run-scoped guards, on by default, which a user opts *out* of explicitly:

  - **keys**: a key already used by *any* step of the process is refused (the same key gives the
    same noise bit for bit; two releases with equal noise cancel it).  The used keys' two 32-bit
    words are kept in a process-wide set (16 bytes a step); CPU keys (the default) are read
    without a device sync.  Eagerly a plain check; inside ``torch.compile`` the custom op
    ``fundp::claim_key``, so a compiled step (``fullgraph=True`` included) refuses a reused key
    with no graph break.  Opt out per step with ``dp_step(..., check_key_reuse=False)`` (e.g. a
    test comparing two steps on one key); :func:`forget_keys` starts a new run scope.  A
    noiseless call (sigma a plain 0, no adaptive clipping) is not checked: it has no noise to cancel.
  - **masks**: fundp's samplers tag each mask they yield with themselves (``tag_mask``,
    weakly), so a step refuses a batch whose sampler contradicts its accounting, ``sampler=`` or
    not; they also tag the padded index tensors they yield (``tag_padded``), which a step refuses
    without ``mask=``.  Data gathered with the indices (``x[indices]``) is a new tensor without
    the tag: gather it into a :class:`fundp.data.Batch` (:func:`fundp.data.gather`), which carries
    its mask and sampler.  A raw batch passed without a mask whose last two rows are equal in every
    leaf (as padding rows, copies of one example, are) is refused (:class:`MissingMaskError`);
    opt out with ``dp_step(..., check_padding=False)`` where the data legitimately repeats rows.
  - **ledgers**: a ledger that a completed step already recorded on is *consumed*; every step
    object of the process refuses it (a flag on the ledger object itself: no cap, no registry).
    A step that raises leaves its ledger unconsumed, so the same ledger continues the run.
  - **params that require grad** (``dict(model.named_parameters())``) are detached with a
    one-time warning: otherwise the autograd graph grows by one node per step.

Example:
  >>> import fundp
  >>> from fundp.guards import UNSUPPORTED
  >>> sorted(UNSUPPORTED)[:1]
  [('adaptive_clipping', 'clip_style=per_layer')]
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

import torch

__all__ = ["UNSUPPORTED", "SAMPLER_NAMES", "UnsupportedCombination", "refusal", "check_combination", "check_sampler",
           "forget_keys", "KeyReuseError", "MissingMaskError", "StaleLedgerError"]

_MECHANISM_BATCHES = (
    "with a noise_mechanism: the mechanism accounts only the batches of its participation schema (an example may "
    "join steps closer or more often than it assumes, and fundp.mf.epsilon would under-report): use "
    "fundp.mf.cyclic_poisson_batches built for it")

#: Refused pairs of ``dp_step`` options (sorted names) -> (exception type, reason).  A sampler is
#: named by its kind, ``sampler=<kind>`` (a :class:`fundp.data.Batch`'s or a tagged mask's sampler
#: counts as the step's sampler); ``noise_mechanism=None`` is i.i.d. noise (DP-SGD's accounting).
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("adaptive_clipping", "secure_mode"): (
        NotImplementedError,
        "adaptive_clipping with secure_mode=True is not supported yet: the count query's noise "
        "would not come from the hardened sampler"),
    ("adaptive_clipping", "clip_style=per_layer"): (
        NotImplementedError,
        "adaptive_clipping adapts one flat threshold: use clip_style='flat' or 'automatic'"),
    ("budget", "noise_mechanism"): (
        ValueError,
        "budget accounts DP-SGD's ledger, which does not apply to a noise_mechanism: use its own "
        "accountant (fundp.mf)"),
    ("noise_mechanism", "secure_mode"): (
        NotImplementedError,
        "secure_mode with a noise_mechanism: the mechanism draws its own noise"),
    ("adaptive_clipping", "noise_mechanism"): (
        NotImplementedError,
        "adaptive_clipping with a cyclic-Poisson (or non-fundp.mf) correlated noise_mechanism: the amplification "
        "argument (Choquette-Choo et al. 2023, Thm 4) does not cover the noisy unclipped-count query, so epsilon "
        "would be under-reported; single_participation / min_separation mechanisms of fundp.mf are accounted"),
    ("noise_mechanism", "noise_multiplier (per call)"): (
        ValueError,
        "a noise_multiplier schedule (step(..., noise_multiplier=...)) with a cyclic-Poisson, a non-banded "
        "min-separation or a non-fundp.mf correlated noise_mechanism is not accounted (cyclic Poisson's amplification "
        "charges one step per pass at one sigma; a non-banded min-separation strategy would need its whole Gram matrix "
        "weighted by the schedule): build the step with the schedule's smallest sigma instead; single_participation and "
        "banded min_separation mechanisms of fundp.mf account a data-independent schedule exactly"),
    ("noise_mechanism=None", "sampler=shuffled"): (
        ValueError,
        "shuffled fixed-size batches are not Poisson sampling: DP-SGD's Poisson-subsampled accounting (the ledger's "
        "sample_rate) does not describe them and no amplification by shuffling is accounted here; use "
        "fundp.data.poisson_batches (or, without sampler=, a fundp.mf noise_mechanism whose participation describes "
        "fixed-order epochs)"),
    ("noise_mechanism=None", "sampler=cyclic_poisson"): (
        ValueError,
        "cyclic Poisson batches need a noise_mechanism: their guarantee is the mechanism's (Choquette-Choo et al. 2023), "
        "not DP-SGD's Poisson accounting over all examples; build the step with dp_step(..., noise_mechanism=mechanism) "
        "for the same partitions and rate (fundp.mf.cyclic_poisson_batches)"),
    ("noise_mechanism", "sampler=poisson"): (ValueError, "Poisson batches " + _MECHANISM_BATCHES),
    ("noise_mechanism", "sampler=truncated_poisson"): (ValueError, "truncated Poisson batches " + _MECHANISM_BATCHES),
    ("noise_mechanism", "sampler=shuffled"): (ValueError, "shuffled batches " + _MECHANISM_BATCHES),
    ("noise_mechanism", "sampler=cyclic_poisson (other participation)"): (
        ValueError,
        "cyclic Poisson batches that break the noise_mechanism's participation schema (other partitions or rate, or an "
        "example joining steps closer or more often than it assumes): build the batches and the mechanism for each "
        "other (fundp.mf.cyclic_poisson_batches(..., num_partitions=b) with mf.cyclic_poisson(b, q), or b >= min_sep)"),
}

#: ``sampler.sampling`` -> the name its rows in :data:`UNSUPPORTED` use.
SAMPLER_NAMES = {"poisson": "sampler=poisson", "truncated_poisson": "sampler=truncated_poisson",
                 "shuffle": "sampler=shuffled", "cyclic_poisson": "sampler=cyclic_poisson"}


class UnsupportedCombination(Exception):
    """The error of a refused combination: ``.pair`` is its row of :data:`UNSUPPORTED`.

    Raised as a subclass of the row's exception type too (``ValueError`` or
    ``NotImplementedError``), so ``except ValueError`` keeps working.
    """

    pair: tuple[str, str]


_REFUSAL_TYPES: dict[type, type] = {}


def refusal(pair: tuple[str, str], detail: str | None = None) -> Exception:
    """The exception refusing ``pair`` (a row of :data:`UNSUPPORTED`): its type and reason, then
    ``detail`` (what this refusal saw) in parentheses; ``.pair`` names the row.

    Example:
      >>> from fundp.guards import UnsupportedCombination, refusal
      >>> error = refusal(("budget", "noise_mechanism"))
      >>> isinstance(error, ValueError), isinstance(error, UnsupportedCombination), error.pair
      (True, True, ('budget', 'noise_mechanism'))
    """
    base, reason = UNSUPPORTED[pair]
    kind = _REFUSAL_TYPES.get(base)
    if kind is None:
        kind = _REFUSAL_TYPES[base] = type(f"Unsupported{base.__name__}", (UnsupportedCombination, base), {})
    error = kind(reason if detail is None else f"{reason} ({detail})")
    error.pair = pair
    return error


def check_sampler(sampling: str, noise_mechanism: bool) -> None:
    """Raises the :data:`UNSUPPORTED` refusal of a sampler of kind ``sampling`` (``sampler.sampling``)
    with i.i.d. noise (``noise_mechanism=False``) or a correlated-noise mechanism.

    Example:
      >>> from fundp.guards import check_sampler
      >>> check_sampler("poisson", noise_mechanism=False)
      >>> try:
      ...     check_sampler("cyclic_poisson", noise_mechanism=False)
      ... except ValueError as error:
      ...     print(error.pair)
      ('noise_mechanism=None', 'sampler=cyclic_poisson')
    """
    name = SAMPLER_NAMES.get(sampling, f"sampler={sampling}")
    check_combination({name: True, "noise_mechanism": noise_mechanism, "noise_mechanism=None": not noise_mechanism})


def check_combination(options: dict[str, bool], accepted: Any = ()) -> None:
    """Raises the :data:`UNSUPPORTED` table's error for the first refused pair among ``options``
    (``{name: in use}``), except the pairs in ``accepted`` (a pair whose refusal is narrower than
    its names: ``("adaptive_clipping", "noise_mechanism")`` for a single-participation or
    min-separation mechanism of :mod:`fundp.mf`, whose ``account`` composes the count query).

    Example:
      >>> from fundp.guards import check_combination
      >>> check_combination({"budget": True, "noise_mechanism": False})
      >>> try:
      ...     check_combination({"budget": True, "noise_mechanism": True})
      ... except ValueError as error:
      ...     print(str(error).split(":")[0])
      budget accounts DP-SGD's ledger, which does not apply to a noise_mechanism
    """
    for pair in UNSUPPORTED:
        if options.get(pair[0]) and options.get(pair[1]) and pair not in accepted:
            raise refusal(pair)


class KeyReuseError(ValueError):
    """A key already used by a step of this process was passed again (it would repeat the noise)."""


class StaleLedgerError(ValueError):
    """A ledger that a completed step already recorded on was passed again."""


# ----------------------------------------------------------------------------- keys

_LOCK = threading.Lock()
_USED_KEYS: set[tuple[int, int]] = set()


def forget_keys() -> None:
    """Starts a new key scope: keys used so far may be used again (e.g. between independent tests).

    Example:
      >>> from fundp.guards import forget_keys
      >>> forget_keys()
    """
    with _LOCK:
        _USED_KEYS.clear()


def _reuse_error(words: tuple[int, int]) -> KeyReuseError:
    return KeyReuseError(
        f"key {list(words)} was already used by a step in this process: the same key gives the "
        "same noise bit for bit, so two releases with it cancel the noise. Derive a fresh key per "
        "step: fundp.random.fold_in(key, t) or fundp.random.split(key), or let fundp.train_step "
        "derive it (it splits TrainState.key every step, so its loops never repeat a key); start an "
        "independent run from fundp.random.os_key(). Opt out explicitly only where equal noise is "
        "wanted (e.g. comparing two steps): dp_step(..., check_key_reuse=False)"
    )


def claim_key(key: torch.Tensor) -> tuple[int, int]:
    """Records ``key`` as used by this process; raises :class:`KeyReuseError` if it already was.

    Reads the key's two words on the host: free for a CPU key (the default of
    :func:`fundp.random.key`), one 16-byte device read (a sync) for an accelerator key.
    Returns the key's words.
    """
    from fundp.random import key_data

    words = key_data(key)
    with _LOCK:
        if words in _USED_KEYS:
            raise _reuse_error(words)
        _USED_KEYS.add(words)
    return words


def _define_claim_key_op() -> Any:
    """``torch.ops.fundp.claim_key(key) -> key`` (a copy): :func:`claim_key` as an opaque custom op.

    Inside ``torch.compile`` (``fullgraph=True`` included) the op stays in the graph as one node
    (no graph break) and runs :func:`claim_key` on the real key each time the graph runs, so the
    compiled step refuses a reused key as the eager one does.  The step draws its randomness from
    the op's output, so the op can be neither dropped nor reordered after the noise.
    """
    existing = getattr(getattr(torch.ops, "fundp", None), "claim_key", None)
    if existing is not None:  # already registered in this process (fundp imported twice)
        return existing

    @torch.library.custom_op("fundp::claim_key", mutates_args=())
    def claim_key_op(key: torch.Tensor) -> torch.Tensor:
        claim_key(key)
        return key.clone()

    @claim_key_op.register_fake
    def _(key: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(key)

    return claim_key_op


_claim_key_op = _define_claim_key_op()


def claimed(key: torch.Tensor) -> torch.Tensor:
    """``key``, refused (:class:`KeyReuseError`) if a step of this process already used it.

    Under ``torch.compile`` the check is the custom op ``fundp::claim_key`` (one graph node, no
    graph break: ``fullgraph=True`` works), which also records the key; the step draws from its
    output.  Eagerly the key is only checked here and recorded by :func:`record_key` once the step
    has completed, so a step that raises (a wrong batch, an engine refusal) leaves its key usable.
    """
    if torch.compiler.is_compiling():
        return _claim_key_op(key)
    from fundp.random import key_data

    words = key_data(key)
    with _LOCK:
        used = words in _USED_KEYS
    if used:
        raise _reuse_error(words)
    return key


def record_key(key: torch.Tensor) -> None:
    """Records ``key`` as used once an eager step completed (the compiled op already recorded it)."""
    if not torch.compiler.is_compiling():
        from fundp.random import key_data

        with _LOCK:
            _USED_KEYS.add(key_data(key))


# ----------------------------------------------------------------------------- ledgers


def check_not_consumed(ledger: Any) -> None:
    if getattr(ledger, "_consumed", False):
        raise StaleLedgerError(
            "this ledger is stale: a step (of this or another step object) already recorded on it and "
            "returned a newer one. Keep it: `ledger = out.ledger` after every step (with the old one, "
            "epsilon would be under-reported). To start an unrelated run, pass a fresh fundp.Ledger()"
        )


def consume(ledger: Any) -> None:
    """Marks ``ledger`` as consumed (called once a step that recorded on it has completed)."""
    if ledger is not None and hasattr(ledger, "_consumed"):
        object.__setattr__(ledger, "_consumed", True)


# ----------------------------------------------------------------------------- masks


class MissingMaskError(ValueError):
    """A padded batch came without its mask: each padding row (a copy of one example) would count
    as a real example, multiplying that example's influence."""


_WHAT_TO_DO = (
    "Pass the mask the sampler yielded with the batch (`indices, mask = batches[t]; step(params, "
    "x[indices], key, mask=mask)`), or gather the batch into a value that carries it "
    "(`step(params, fundp.data.gather(x, indices, mask), key)`; fundp.data.poisson_loader yields such "
    "values)")


def refuse_repeated_rows_without_mask(batch: Any, first_call: bool) -> None:
    """Refuses (:class:`MissingMaskError`) a batch passed without a mask that looks padded.

    fundp's samplers pad a batch with copies of example 0 at its end, so without the mask each
    padding row counts as a real example (up to ``pad_to_multiple - 1`` copies: that example's
    influence is that many times ``C``).  Data gathered with the indices (``x[indices]``) is a new
    tensor, so a step cannot know it is padded; it looks: when the last two rows of every leaf are
    equal (the padding of a batch with at least two padding rows) the batch is refused.  Data that
    legitimately repeats rows opts out with ``dp_step(..., check_padding=False)``.  Reads two rows
    per leaf: on every eager call for CPU tensors (no device sync); for accelerator tensors (one
    sync) only on a step object's first unmasked call (``first_call``).  Not run inside
    ``torch.compile``.

    Example:
      >>> import torch
      >>> from fundp.guards import refuse_repeated_rows_without_mask
      >>> refuse_repeated_rows_without_mask(torch.eye(3), first_call=True)  # distinct rows: accepted
      >>> try:
      ...     refuse_repeated_rows_without_mask(torch.tensor([[1.0], [2.0], [2.0]]), first_call=True)
      ... except ValueError as error:
      ...     print(str(error).split(":")[0])
      the batch came without a mask and its last two rows are equal, as the padding rows of fundp's samplers are
    """
    import optree

    leaves = [leaf for leaf in optree.tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1]
    if not leaves or leaves[0].shape[0] < 2 or torch.compiler.is_compiling():
        return
    if not first_call and any(leaf.device.type != "cpu" for leaf in leaves):
        return  # one device sync a step: looked at once per step object
    if all(torch.equal(leaf[-1], leaf[-2]) for leaf in leaves):
        raise MissingMaskError(
            "the batch came without a mask and its last two rows are equal, as the padding rows of fundp's "
            "samplers are: without its mask each padding row (a copy of one example) counts as a real example, "
            f"so that example's influence is a multiple of max_norm. {_WHAT_TO_DO}. If your data legitimately "
            "repeats rows and every row is a real example, opt out: dp_step(..., check_padding=False)")


# ----------------------------------------------------------------------------- batches' provenance

_MASK_SOURCES: dict[int, tuple[Any, Any]] = {}
_PADDED_BATCHES: dict[int, tuple[Any, Any]] = {}


def _remember(registry: dict[int, tuple[Any, Any]], tensor: Any, value: Any) -> None:
    """``registry[id(tensor)] = value``, weakly: the entry goes when ``tensor`` is freed."""
    if not isinstance(tensor, torch.Tensor):
        return
    key = id(tensor)

    def forget(ref: Any, key: int = key) -> None:
        entry = registry.get(key)
        if entry is not None and entry[0] is ref:
            registry.pop(key, None)

    registry[key] = (weakref.ref(tensor, forget), value)


def _recall(registry: dict[int, tuple[Any, Any]], tensor: Any) -> Any:
    """What :func:`_remember` stored for ``tensor`` (this very object), or ``None``."""
    entry = None if tensor is None else registry.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]


def tag_mask(mask: Any, sampler: Any) -> None:
    """Remembers that ``sampler`` yielded ``mask`` (weakly: forgotten when the mask is freed).

    fundp's samplers tag the mask of every batch they yield (``batches[t]``, iteration), so a
    step can refuse a batch whose sampler contradicts what it accounts, even when it was built
    without ``sampler=`` (:func:`mask_source`).  A copy of the mask (``mask.to(device)`` onto
    another device, slicing) carries no tag: the check is then skipped, not failed.
    """
    _remember(_MASK_SOURCES, mask, sampler)


def mask_source(mask: Any) -> Any:
    """The sampler that yielded ``mask`` (:func:`tag_mask`), or ``None`` when unknown."""
    return _recall(_MASK_SOURCES, mask)


def tag_padded(batch: Any, sampler: Any) -> None:
    """Remembers that ``sampler`` padded ``batch`` (a tensor; weakly, as :func:`tag_mask` does).

    fundp's samplers tag the padded index tensor of every batch whose rows may include padding
    (every Poisson batch: whether it is padded is chance, so the refusal must not be; a shuffled
    batch only when it is padded), so that a step given it without ``mask=`` refuses it
    (:func:`refuse_padded_without_mask`).  Data gathered with it (``x[indices]``) is a new tensor
    without the tag: gather it into a :class:`fundp.data.Batch` instead (:func:`fundp.data.gather`),
    or the step falls back on :func:`refuse_repeated_rows_without_mask`.
    """
    _remember(_PADDED_BATCHES, batch, sampler)


def refuse_padded_without_mask(batch: Any) -> None:
    """Raises :class:`MissingMaskError` when a leaf of ``batch`` is a padded batch tagged by :func:`tag_padded`
    (the step was called with ``mask=None``): its padding rows would each count as a real example.

    Example:
      >>> import fundp
      >>> from fundp.guards import refuse_padded_without_mask
      >>> indices, mask = fundp.data.poisson_batches(10, 0.5, fundp.random.key(0), steps=1, pad_to_multiple=8)[0]
      >>> try:
      ...     refuse_padded_without_mask(indices)
      ... except ValueError as error:
      ...     print(str(error).split(":")[0])
      mask=None with a padded batch of PoissonBatches(...)
    """
    import optree

    for leaf in optree.tree_leaves(batch):
        sampler = _recall(_PADDED_BATCHES, leaf)
        if sampler is not None:
            raise MissingMaskError(
                f"mask=None with a padded batch of {type(sampler).__name__}(...): its padding rows (copies of "
                f"one example) would each count as a real example, multiplying that example's influence. {_WHAT_TO_DO}")


# ----------------------------------------------------------------------------- params

_warned_requires_grad = False


def detach_params(params: Any) -> Any:
    """``params`` with every leaf that requires grad detached (a one-time warning per process).

    ``dict(model.named_parameters())`` keeps ``requires_grad``; the step's outputs would then carry
    an autograd graph that grows by one node per step (unbounded memory).  Detaching is exact:
    the step takes its own per-example gradients with ``torch.func``.
    """
    import optree

    leaves = optree.tree_leaves(params)
    if not any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in leaves):
        return params
    global _warned_requires_grad
    if not _warned_requires_grad and not torch.compiler.is_compiling():
        _warned_requires_grad = True
        warnings.warn(
            "params require grad (e.g. dict(model.named_parameters())): fundp detaches them, so the "
            "autograd graph does not grow across steps. Pass detached params to silence this: "
            "{k: v.detach() for k, v in model.named_parameters()}",
            UserWarning,
            stacklevel=3,
        )
    return optree.tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) and leaf.requires_grad else leaf, params)
