"""The stateless DP-SGD step: one pipeline from per-example losses to private gradients.

One step computes, for a logical batch of ``B`` rows of which the unmasked ones are real examples,

    grads = (sum_i c_i g_i + N(0, (noise_multiplier * S)^2 I)) / expected_batch_size

with ``g_i`` the per-example gradients, ``c_i`` the clip factors (see :mod:`fundp.clipping`) and
``S`` the clipping sensitivity (``max_norm``, or ``sqrt(sum_l C_l^2)`` per layer).  The division is
by the *expected* batch size ``sample_rate * N``, never the realised one, whose value would leak
under Poisson sampling.

The pipeline, each stage a pure function of values:

1. :func:`clipped_grad_sum` — the data-dependent half: a :class:`~fundp.types.ClippedSum` that
   carries its own sensitivity ``S``;
2. :func:`accumulate` — optional: the same, over fixed-size physical chunks of a logical batch,
   the chunks' sums added with :func:`add_clipped_sums` (gradient accumulation);
3. the all-reduce across ranks (``distributed=True``), which keeps ``S``;
4. a privatizer (:mod:`fundp.privatizers`: i.i.d., secure or correlated noise, and adaptive
   clipping's count query) — the noisy sum and the privacy event it spent; then the division, once;
5. accounting — the ledger records the events with the sampler's rate, outside the compiled graph.

:func:`dp_step` assembles three values — the sampling plan, the clipped-sum function and the
privatizer — after consulting the table of refused combinations (:data:`fundp.guards.UNSUPPORTED`);
noise, normalisation and accounting happen in exactly one place (here).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Protocol

import optree
import torch

from fundp import guards as fundp_guards
from fundp import random as fundp_random
from fundp._validate import check_batch, check_int, check_mask, check_nonnegative, check_positive, check_sample_rate
from fundp.clipping import (
    CLIP_STYLES,
    SUM_DTYPE,
    clip_factors_from_sq_norms,
    clip_sensitivity,
    is_threshold_tensor,
    per_layer_thresholds,
)
from fundp.engines import make_engine
from fundp.guards import detach_params
from fundp.privatizers import quantile_privatizer
from fundp.privatizers import round_to as _round_to
from fundp.types import ClippedSum, ClipStyle, GradMethod, Randomness, Step, StepResult, Verify

__all__ = [
    "ClippedSum",
    "StepResult",
    "Step",
    "clipped_grad_sum",
    "accumulate",
    "split_batch",
    "add_clipped_sums",
    "privatize",
    "dp_step",
]

GRAD_METHODS = ("vmap", "ghost", "auto")
RANDOMNESS = ("error", "different", "same")


class ClippedSumFn(Protocol):
    """``f(params, batch, mask=None, key=None, *, max_norm=None) -> ClippedSum``."""

    def __call__(
        self, params: Any, batch: Any, mask: torch.Tensor | None = None, key: torch.Tensor | None = None, *, max_norm: Any = None
    ) -> ClippedSum: ...


# --------------------------------------------------------------------------- argument checks


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_verify(verify: Any) -> None:
    if not (verify is False or (isinstance(verify, str) and verify in ("first", "always"))):
        raise ValueError(f"verify must be False, 'first' or 'always', got {verify!r}")


def _check_max_norm_tree(max_norm: Any, clip_style: str) -> None:
    """Build-time check of every threshold (values of tensors included: nothing is traced yet)."""
    if clip_style == "per_layer" and not isinstance(max_norm, (int, float, torch.Tensor)):
        leaves = optree.tree_leaves(max_norm)
        if not leaves:
            raise ValueError("max_norm must hold at least one threshold")
        for threshold in leaves:
            check_positive("max_norm", threshold)
        return
    check_positive("max_norm", max_norm)


def _check_scalar(name: str, value: Any) -> Any:
    """A number >= 0 (checked) or a 0-d floating tensor (kept as a traced graph input)."""
    if is_threshold_tensor(value):
        return value
    return check_nonnegative(name, value)


# --------------------------------------------------------------------------- clipped sums


@torch.compiler.disable
def _raise_if_nonfinite(params: Any, losses_ok: torch.Tensor) -> None:
    for path, leaf in zip(*optree.tree_flatten_with_path(params)[:2]):
        if not bool(torch.isfinite(leaf).all()):
            raise FloatingPointError(f"params{''.join(f'[{p!r}]' for p in path)} contains NaN or Inf")
    if not bool(losses_ok):
        raise FloatingPointError("the loss of a real (unmasked) example is NaN or Inf")


def clipped_grad_sum(
    loss_fn: Callable,
    *,
    max_norm: Any,
    clip_style: ClipStyle = "flat",
    gamma: float = 0.01,
    grad_method: GradMethod = "auto",
    has_aux: bool = False,
    randomness: Randomness = "error",
    verify: Verify = "first",
    check_batch_consistency: bool = True,
    check_finite: bool = False,
) -> ClippedSumFn:
    """Transform: returns ``f(params, batch, mask=None, key=None, *, max_norm=None) -> ClippedSum``.

    ``f`` computes ``sum_i c_i g_i`` over the real rows of ``batch`` (``mask[i]`` True, or all
    rows), with clip factors ``c_i`` from ``clip_style`` (see :func:`fundp.clip`), and returns it
    as a :class:`~fundp.types.ClippedSum` that carries its L2 sensitivity (``C``, or
    ``sqrt(sum_l C_l^2)`` per layer), accumulated in float64 whatever the parameters' dtype
    (``ClippedSum.dtypes`` records theirs; :func:`privatize` rounds to them after the noise).
    Complex parameters are refused (``TypeError``).  Masked rows and examples with a non-finite gradient
    contribute exactly zero (and nothing to ``loss_sum``).  ``key`` drives the model's random ops
    when ``randomness="different"``.  ``max_norm`` at call time overrides the built threshold
    (a 0-d tensor under ``torch.compile`` never recompiles).  ``verify`` is passed to the
    engine: when a fast engine (``"ghost"``) is checked against single-example gradients.
    ``check_batch_consistency``: on every call of the ghost path, the losses of a random quarter of
    the batch must equal the batch's (see :mod:`fundp.engines.ghost._consistency`).
    ``check_finite``: debug mode, raise ``FloatingPointError`` for NaN/Inf params or losses of
    real rows (a device sync, outside the graph).

    Example:
      >>> import torch, fundp
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> out = f({"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
      >>> out.grads["w"], out.sensitivity
      (tensor([0.9000, 1.2000], dtype=torch.float64), 1.0)
    """
    _check_choice("clip_style", clip_style, CLIP_STYLES)
    _check_choice("grad_method", grad_method, GRAD_METHODS)
    _check_choice("randomness", randomness, RANDOMNESS)
    _check_verify(verify)
    if not isinstance(check_batch_consistency, bool):
        raise TypeError(f"check_batch_consistency must be a bool, got {check_batch_consistency!r}")
    _check_max_norm_tree(max_norm, clip_style)
    gamma = check_positive("gamma", gamma)
    engine = make_engine(grad_method, loss_fn, has_aux=has_aux, randomness=randomness, verify=verify,
                         check_batch_consistency=check_batch_consistency)
    built_max_norm = max_norm

    def f(
        params: Any, batch: Any, mask: torch.Tensor | None = None, key: torch.Tensor | None = None, *, max_norm: Any = None
    ) -> ClippedSum:
        threshold = built_max_norm if max_norm is None else max_norm
        size = check_batch(batch)
        if mask is not None:
            check_mask(mask, size)
        dtypes = _param_dtypes(params)
        out = engine(params, batch, key)
        if not isinstance(out.losses, torch.Tensor) or out.losses.shape != (size,):
            raise ValueError(f"loss_fn must return per-example losses of shape [B] = [{size}]")
        factors, norms, finite = clip_factors_from_sq_norms(out.sq_norms, threshold, style=clip_style, gamma=gamma)
        in_batch = torch.ones_like(finite) if mask is None else mask
        kept = finite & in_batch
        factors = optree.tree_map(lambda c: torch.where(kept, c, torch.zeros_like(c)), factors)
        # Accumulated in float64 whatever the parameters' dtype; rounded once, after the noise.
        grads = optree.tree_map(lambda g: g.to(SUM_DTYPE), out.weighted_sum(factors))
        losses = out.losses
        if check_finite:
            real_losses = torch.where(in_batch, losses, torch.zeros_like(losses))
            _raise_if_nonfinite(params, torch.isfinite(real_losses).all())
        # Rows dropped for a non-finite gradient stay out of the loss mean as out of the sum.
        loss_sum = torch.where(kept, losses, torch.zeros_like(losses)).sum()
        norms = torch.where(in_batch, norms, torch.zeros_like(norms))
        norms = norms.to(torch.float64 if torch.float64 in dtypes else torch.float32)
        num_nonfinite = (in_batch & ~finite).sum()
        sensitivity = clip_sensitivity(threshold, style=clip_style, params=params)
        return ClippedSum(grads, loss_sum, kept.sum(), norms, num_nonfinite, out.aux, sensitivity, dtypes)

    return f


def _param_dtypes(params: Any) -> tuple:
    """The parameters' dtypes in leaf order; complex parameters are refused (``TypeError``), and
    aliased ones (:func:`_refuse_aliased_params`)."""
    dtypes = tuple(getattr(leaf, "dtype", None) for leaf in optree.tree_leaves(params))
    for path, dtype in zip(optree.tree_paths(params), dtypes):
        if dtype is not None and dtype.is_complex:
            raise TypeError(
                f"params{''.join(f'[{p!r}]' for p in path)} is complex ({dtype}): fundp clips real gradients "
                "only (the real part's norm would not bound the sensitivity). Keep complex weights as a real "
                "parameter of shape [..., 2] and build them with torch.view_as_complex inside loss_fn"
            )
    # Always here, even where the ghost engine scans again: under torch.compile this function
    # may run eagerly at a graph break while the engine's own scan is traced away.
    _refuse_aliased_params(params)
    return dtypes


def _refuse_aliased_params(params: Any) -> None:
    """Two leaves that share memory would be clipped apart although they update one tensor (the
    sum of their gradients can exceed ``C``): refused for every engine.  Eagerly the byte ranges
    are compared (views too); under ``torch.compile`` the identity check, which dynamo folds."""
    from fundp._validate import AliasedParametersError, check_params

    if not torch.compiler.is_compiling():
        check_params(params)
        return
    leaves = optree.tree_leaves(params)
    paths = optree.tree_paths(params)
    for i, leaf in enumerate(leaves):
        for j in range(i):
            if leaves[j] is leaf:
                raise AliasedParametersError(
                    f"params{''.join(f'[{p!r}]' for p in paths[j])} and params{''.join(f'[{p!r}]' for p in paths[i])} "
                    "share memory (the same tensor): their per-example gradients would be clipped apart although "
                    "they update one parameter. Pass the tensor once and reuse it inside loss_fn")


def _same_sensitivity(first: Any, second: Any) -> Any:
    if first is second:
        return first
    if first is None or second is None:
        raise ValueError("add_clipped_sums: one ClippedSum has no sensitivity (both must carry the same)")
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        if torch.compiler.is_compiling():
            return first  # cannot be read inside a graph; sums built by one step share one value
        equal = bool(torch.as_tensor(first, dtype=torch.float64).eq(torch.as_tensor(second, dtype=torch.float64)).all())
    else:
        equal = math.isclose(float(first), float(second), rel_tol=1e-12, abs_tol=0.0)
    if not equal:
        raise ValueError(
            f"add_clipped_sums: the sums have different sensitivities ({first} and {second}); "
            "chunks of one logical batch must be clipped with the same thresholds"
        )
    return first


def add_clipped_sums(first: ClippedSum, second: ClippedSum) -> ClippedSum:
    """Adds the clipped sums of two physical chunks of one logical batch.

    Gradient sums, loss sums and counts are added; ``norms`` and ``aux`` (per-example) are
    concatenated; the sensitivity is kept (the chunks are disjoint rows of one batch, so one
    example still changes the total by at most ``S``).  Raises ``ValueError`` when the two
    sensitivities differ.

    Example:
      >>> import torch, fundp
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> p = {"w": torch.zeros(2)}
      >>> total = fundp.add_clipped_sums(f(p, torch.eye(2)), f(p, torch.eye(2)))
      >>> total.grads["w"], total.norms.shape, total.sensitivity
      (tensor([2., 2.], dtype=torch.float64), torch.Size([4]), 1.0)
    """
    sensitivity = _same_sensitivity(first.sensitivity, second.sensitivity)
    if first.aux is None or second.aux is None:
        aux = None
    else:
        aux = optree.tree_map(lambda a, b: torch.cat([a, b]), first.aux, second.aux)
    return ClippedSum(
        optree.tree_map(torch.add, first.grads, second.grads),
        first.loss_sum + second.loss_sum,
        first.num_examples + second.num_examples,
        torch.cat([first.norms, second.norms]),
        first.num_nonfinite + second.num_nonfinite,
        aux,
        sensitivity,
        first.dtypes if first.dtypes is not None else second.dtypes,
    )


def split_batch(batch: Any, physical_batch_size: int, mask: torch.Tensor | None = None) -> list[tuple[Any, torch.Tensor]]:
    """Splits a batch into ``ceil(B / physical_batch_size)`` chunks of exactly ``physical_batch_size`` rows.

    Returns ``[(chunk, chunk_mask), ...]``: the chunks are consecutive row ranges of ``batch`` (a
    pytree of tensors sharing dim 0); the last is filled up with copies of row 0 whose
    ``chunk_mask`` is False.  ``mask`` (``BoolTensor[B]``, default all True) is carried along.
    The real rows of all chunks together are exactly the real rows of ``batch``.

    Example:
      >>> import torch, fundp
      >>> chunks = fundp.data.split_batch({"x": torch.arange(5.0)}, 2)
      >>> [(c["x"].tolist(), m.tolist()) for c, m in chunks]
      [([0.0, 1.0], [True, True]), ([2.0, 3.0], [True, True]), ([4.0, 0.0], [True, False])]
    """
    size = check_batch(batch)
    physical = check_int("physical_batch_size", physical_batch_size, minimum=1)
    leaves = optree.tree_leaves(batch)
    if mask is None:
        mask = torch.ones(size, dtype=torch.bool, device=leaves[0].device)
    else:
        check_mask(mask, size)
    num_chunks = -(-size // physical)
    extra = num_chunks * physical - size
    if extra:
        batch = optree.tree_map(lambda leaf: torch.cat([leaf, leaf[:1].expand(extra, *leaf.shape[1:])]), batch)
        mask = torch.cat([mask, torch.zeros(extra, dtype=torch.bool, device=mask.device)])
    return [
        (optree.tree_map(lambda leaf: leaf[start : start + physical], batch), mask[start : start + physical])
        for start in range(0, num_chunks * physical, physical)
    ]


def accumulate(clipped_sum_fn: ClippedSumFn, physical_batch_size: int) -> ClippedSumFn:
    """Transform of a clipped-sum function: the same sum, computed over fixed-size physical chunks.

    Returns ``g(params, batch, mask=None, key=None, **kwargs) -> ClippedSum`` which splits the
    logical batch with :func:`split_batch` into chunks of exactly ``physical_batch_size`` rows
    (the only shape ``clipped_sum_fn`` ever sees), calls ``clipped_sum_fn`` on each (chunk ``c``
    gets the model key ``fold_in(key, c)``) and adds the results with :func:`add_clipped_sums`.
    ``norms`` and ``aux`` come back with the logical batch's ``B`` rows.  Noise is added later,
    once, by :func:`privatize`: this is gradient accumulation with one noise draw per step.

    Example:
      >>> import torch, fundp
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> g = fundp.step.accumulate(f, 2)
      >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 1.0]])
      >>> bool(torch.allclose(g({"w": torch.zeros(2)}, x).grads["w"], f({"w": torch.zeros(2)}, x).grads["w"]))
      True
    """
    physical = check_int("physical_batch_size", physical_batch_size, minimum=1)

    def g(params: Any, batch: Any, mask: torch.Tensor | None = None, key: torch.Tensor | None = None, **kwargs: Any) -> ClippedSum:
        size = check_batch(batch)
        if size == 0:
            return clipped_sum_fn(params, batch, mask, key, **kwargs)
        total: ClippedSum | None = None
        for number, (chunk, chunk_mask) in enumerate(split_batch(batch, physical, mask)):
            chunk_key = None if key is None else fundp_random.fold_in(key, number)
            part = clipped_sum_fn(params, chunk, chunk_mask, chunk_key, **kwargs)
            total = part if total is None else add_clipped_sums(total, part)
        assert total is not None
        aux = None if total.aux is None else optree.tree_map(lambda a: a[:size], total.aux)
        return total._replace(norms=total.norms[:size], aux=aux)

    g.physical_batch_size = physical  # type: ignore[attr-defined]
    return g


# --------------------------------------------------------------------------- noise


def _normalise(noisy_sum: Any, expected_batch_size: Any, dtypes: Any) -> Any:
    """``noisy_sum / expected_batch_size`` rounded to ``dtypes`` once (post-processing)."""
    return _round_to(optree.tree_map(lambda g: g / expected_batch_size, noisy_sum), dtypes)


def privatize(
    clipped: Any,
    key: torch.Tensor,
    *,
    noise_multiplier: Any = None,
    expected_batch_size: float,
    secure_mode: bool = False,
    noise_stddev: Any = None,
) -> Any:
    """Returns ``(clipped.grads + N(0, (noise_multiplier * S)^2)) / expected_batch_size``.

    ``S = clipped.sensitivity`` comes with the :class:`~fundp.types.ClippedSum`, so the noise is
    always calibrated to what was actually clipped (per-layer clipping of four leaves at
    ``C = 1`` has ``S = 2``, not 1).  The noise is drawn from ``key``; with ``secure_mode=True``
    it comes from :mod:`fundp.secure` (OS entropy, hardened sampler) and ``key`` is not used.
    ``noise_multiplier`` is a number >= 0 or a 0-d tensor.  The noise is that of
    :func:`fundp.privatizers.gaussian_privatizer` (:func:`~fundp.privatizers.secure_gaussian_privatizer`).

    Deprecated form: ``privatize(grad_sum_tree, key, noise_stddev=..., expected_batch_size=...)``
    (the caller computes the sensitivity; see :func:`fundp.noise.add_gaussian_noise`).

    Example:
      >>> import torch, fundp
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> clipped = f({"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0]]))
      >>> fundp.privatize(clipped, fundp.random.key(0), noise_multiplier=0.0, expected_batch_size=2.0)["w"]
      tensor([0.3000, 0.4000])
    """
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    if isinstance(clipped, ClippedSum):
        if noise_stddev is not None:
            raise ValueError("privatize(ClippedSum, ...) derives the noise std from its sensitivity: pass noise_multiplier, not noise_stddev")
        if noise_multiplier is None:
            raise ValueError("privatize needs noise_multiplier (the std is noise_multiplier * clipped.sensitivity)")
        if clipped.sensitivity is None:
            raise ValueError("this ClippedSum carries no sensitivity; build it with fundp.clipped_grad_sum")
        sigma, sensitivity, dtypes = _check_scalar("noise_multiplier", noise_multiplier), clipped.sensitivity, clipped.dtypes
    else:
        if noise_stddev is None:
            raise TypeError("privatize takes a fundp.ClippedSum (or, deprecated, a gradient tree with noise_stddev=)")
        warnings.warn(
            "privatize(grad_sum, key, noise_stddev=...) is deprecated: pass the ClippedSum itself with "
            "noise_multiplier=, so that the noise follows its sensitivity",
            DeprecationWarning,
            stacklevel=2,
        )
        sigma, sensitivity = 1.0, _check_scalar("noise_stddev", noise_stddev)
        dtypes = tuple(leaf.dtype for leaf in optree.tree_leaves(clipped))
    # Noise is drawn in float64 and added to the float64 sum; the result is rounded to the
    # parameters' dtypes once, at the very end (post-processing of the Gaussian mechanism).
    noisy, _, _ = _privatizer_plan(sigma, secure_mode, None).privatize(clipped, sensitivity, key, None)
    return _normalise(noisy, expected_batch_size, dtypes)


# --------------------------------------------------------------------------- outside the graph


@torch.compiler.disable
def _before_step(ledger: Any, budget: Any, events: tuple, sampling: "_Sampling") -> Any:
    # Plain Python on plain numbers: kept out of the compiled graph so a growing ledger never
    # triggers a recompile.  Runs before the data is touched, so an over-budget step is refused
    # before anything is computed.  The ledger is consumed only once the step has completed
    # (:func:`_after_step`): a step that raises leaves it usable.
    from fundp.privatizers import record

    if ledger is not None:
        fundp_guards.check_not_consumed(ledger)
    elif budget is not None:
        raise ValueError("budget needs a ledger: pass step(..., ledger=fundp.Ledger())")
    if ledger is None:
        return None
    return record(ledger, events, sample_rate=sampling.sample_rate, truncation=sampling.truncation, budget=budget)


@torch.compiler.disable
def _after_step(ledger: Any) -> None:
    from fundp.guards import consume

    consume(ledger)


# --------------------------------------------------------------------------- the plan's three values


class _Sampling(NamedTuple):
    """What the step knows of its batches: the rate the ledger records, the divisor, the row
    multiple and mask a sampler's batches come with, its truncation, ``N``."""

    sample_rate: float | None
    expected_batch_size: float
    row_multiple: int | None
    needs_mask: bool
    truncation: Any
    num_examples: int | None
    source: tuple | None = None
    sampler: Any = None


def _sampling_of(sampler: Any, sample_rate: float | None, expected_batch_size: Any,
                 noise_mechanism: Any = None) -> tuple[float | None, Any, int | None, bool]:
    """Reads (and checks) the sampling a step is built for: ``(sample_rate, expected_batch_size,
    row multiple, needs mask)``."""
    from fundp.sampling import check_sampling_matches, sampler_of

    inner = sampler_of(sampler)
    # Which sampler goes with which noise: the table's rows (fundp.guards.UNSUPPORTED). Cyclic
    # Poisson batches are the participation of a correlated-noise mechanism (fundp.mf): the
    # mechanism, not DP-SGD's ledger, says what they guarantee; no other batches are its.
    fundp_guards.check_sampler(inner.sampling, noise_mechanism is not None)
    if inner.sampling == "cyclic_poisson":
        if expected_batch_size is None:
            expected_batch_size = inner.expected_batch_size
        _check_cyclic_participation(inner, noise_mechanism, expected_batch_size)
        return sample_rate, expected_batch_size, int(inner.pad_to_multiple), True
    if inner.sampling == "truncated_poisson":
        # One fixed shape; the ledger records each step's truncation (a TruncatedPoisson event),
        # so fundp.epsilon adds its term (delta + (1 + e^eps) T p).
        from fundp.sampling import _check_poisson_rate

        if sample_rate is None:
            sample_rate = inner.sample_rate
        if expected_batch_size is None:
            expected_batch_size = inner.expected_batch_size
        _check_poisson_rate(inner, sample_rate, expected_batch_size)
        return sample_rate, expected_batch_size, int(inner.max_batch_size), True
    if inner.sampling == "poisson":
        if sample_rate is None:
            sample_rate = inner.sample_rate
        if expected_batch_size is None:
            expected_batch_size = inner.expected_batch_size
    check_sampling_matches(sampler, sample_rate, expected_batch_size=expected_batch_size)
    return sample_rate, expected_batch_size, int(inner.pad_to_multiple), True


def _check_cyclic_participation(batches: Any, mechanism: Any, expected_batch_size: Any) -> None:
    """Cyclic Poisson batches must be the mechanism's participation (:func:`fundp.mf.check_batches_match`:
    the same partitions and rate for a cyclic-Poisson mechanism); with ``b`` partitions they put an
    example in steps ``b`` apart, at most ``ceil(n / b)`` of the mechanism's ``n``: refused unless its
    participation allows that (``min_sep <= b``; single participation: ``n <= b``).  Refusals are the
    row ``("noise_mechanism", "sampler=cyclic_poisson (other participation)")`` of the table; a
    divisor that is not ``q N / b`` is refused as such."""
    from fundp.mf import check_batches_match

    row = ("noise_mechanism", "sampler=cyclic_poisson (other participation)")
    try:
        check_batches_match(batches, mechanism)
    except ValueError as error:
        raise fundp_guards.refusal(row, str(error)) from None
    check_batches_match(batches, mechanism, expected_batch_size=expected_batch_size)
    most, steps = getattr(mechanism, "max_participations", None), getattr(mechanism, "steps", None)
    if most is None or steps is None:  # not a fundp.mf mechanism: check_batches_match is all we know
        return
    b, sep = int(batches.num_partitions), int(getattr(mechanism.participation, "min_sep", 1))
    joins = -(-int(steps) // b)
    if b < sep or joins > most():
        raise fundp_guards.refusal(row, f"cyclic Poisson batches with num_partitions={b} put an example in up to {joins} "
                                        f"of the mechanism's {mechanism.steps} steps, {b} apart; "
                                        f"{mechanism.participation!r} assumes at most {most()}, at least {sep} apart")


def _truncation_of(sampler: Any) -> Any:
    """The truncated Poisson sampler the ledger records each step's truncation of, or ``None``."""
    from fundp.sampling import sampler_of

    inner = sampler_of(sampler)
    return inner if inner.sampling == "truncated_poisson" else None


def _sampling_plan(sampler: Any, sample_rate: Any, expected_batch_size: Any, num_examples: Any, noise_mechanism: Any) -> _Sampling:
    """The batches' side of the plan, from the sampler (or, without one, the numbers given)."""
    if sample_rate is not None:
        sample_rate = check_sample_rate(sample_rate)
    row_multiple: int | None = None
    needs_mask = False
    if sampler is not None:
        sample_rate, expected_batch_size, row_multiple, needs_mask = _sampling_of(
            sampler, sample_rate, expected_batch_size, noise_mechanism)
    if num_examples is not None:
        num_examples = check_int("num_examples", num_examples, minimum=1)
        if sample_rate is None:
            raise ValueError("num_examples needs sample_rate (expected_batch_size = sample_rate * num_examples)")
        implied = sample_rate * num_examples
        if expected_batch_size is None:
            expected_batch_size = implied
        elif not math.isclose(check_positive("expected_batch_size", expected_batch_size), implied, rel_tol=1e-6):
            raise ValueError(
                f"expected_batch_size={expected_batch_size} but sample_rate * num_examples = "
                f"{sample_rate} * {num_examples} = {implied}"
            )
    if expected_batch_size is None:
        raise ValueError("expected_batch_size is required (sample_rate * num_examples) unless a sampler or num_examples is given")
    truncation = None if sampler is None else _truncation_of(sampler)
    source = None if sampler is None else _source_of(sampler)
    return _Sampling(sample_rate, check_positive("expected_batch_size", expected_batch_size), row_multiple, needs_mask,
                     truncation, num_examples, source, None if sampler is None else _inner(sampler))


def _inner(sampler: Any) -> Any:
    """The object that describes ``sampler``'s batches (:func:`fundp.sampling.sampler_of`)."""
    from fundp.sampling import sampler_of

    return sampler_of(sampler)


def _source_of(sampler: Any) -> tuple:
    """What identifies a sampler's batches: ``(sampling, sample_rate, num_examples, num_partitions,
    key)``; two samplers equal in these draw the same batches."""
    from fundp.sampling import sampler_of

    inner = sampler_of(sampler)
    key = getattr(inner, "key", getattr(inner, "_key", None))
    words = tuple(key.tolist()) if isinstance(key, torch.Tensor) else None
    return (inner.sampling, getattr(inner, "sample_rate", None), getattr(inner, "num_examples", None),
            getattr(inner, "num_partitions", None), words)


def _intake(batch: Any, mask: Any) -> tuple[Any, Any, Any]:
    """``(rows, mask, sampler)`` of a step's batch: a :class:`fundp.data.Batch` brings its mask and
    sampler (``mask=`` as well is refused); a raw batch brings ``mask=`` and no sampler (``None``)."""
    from fundp.sampling import Batch

    if not isinstance(batch, Batch):
        return batch, mask, None
    if mask is not None:
        raise ValueError("the batch is a fundp.data.Batch, which carries its own mask: do not pass mask= as well")
    return batch.data, batch.mask, batch.sampler


def _check_batch_source(sampling: _Sampling, source: Any, noise_mechanism: Any) -> None:
    """Sampling assumptions come from the sampler: a batch that a fundp sampler yielded (``source``:
    a :class:`fundp.data.Batch`'s sampler, or :func:`fundp.guards.mask_source` of the mask) is
    refused when that sampler contradicts the step (another sampler than ``sampler=``; another rate
    or divisor than ``sample_rate=`` / ``expected_batch_size=``; truncated batches without their
    truncation; shuffled batches for DP-SGD's Poisson accounting; Poisson batches for a
    correlated-noise mechanism, cyclic Poisson ones without a mechanism)."""
    if source is None or (sampling.sampler is not None and source is sampling.sampler):
        return  # (a Batch holds its sampler unwrapped, as sampling.sampler is)
    identity = _source_of(source)
    kind, rate, num = identity[:3]
    if sampling.source is not None:
        if identity != sampling.source:
            raise ValueError(f"the batch comes from {source!r}, not from the sampler the step was built for "
                             f"(sampling, sample_rate, num_examples, ... = {sampling.source}): build the step "
                             "with dp_step(..., sampler=) the sampler that draws its batches")
        return
    if kind == "cyclic_poisson" or noise_mechanism is not None:
        fundp_guards.check_sampler(kind, noise_mechanism is not None)
        _check_cyclic_participation(source, noise_mechanism, sampling.expected_batch_size)
        return
    if kind == "shuffle":
        if sampling.sample_rate is not None:  # a step that accounts DP-SGD at a Poisson rate
            raise fundp_guards.refusal(("noise_mechanism=None", "sampler=shuffled"),
                                       f"the batch comes from {source!r}; the step records sample_rate={sampling.sample_rate}")
        return
    if kind == "truncated_poisson":
        raise ValueError("the batch comes from truncated Poisson batches, whose truncation the ledger must record: "
                         "build the step with dp_step(..., sampler=batches)")
    if sampling.sample_rate is not None and not math.isclose(sampling.sample_rate, rate, rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(f"the step accounts sample_rate={sampling.sample_rate} but the batch comes from {source!r}, "
                         f"Poisson-sampled at {rate}: the ledger would be wrong. Build the step with sampler=batches")
    if not math.isclose(sampling.expected_batch_size, rate * num, rel_tol=1e-6):
        raise ValueError(f"expected_batch_size={sampling.expected_batch_size} but the batch comes from {source!r}, "
                         f"whose sample_rate * num_examples = {rate * num}. Build the step with sampler=batches")


def _check_batch_rows(sampling: _Sampling, batch: Any, mask: Any, world_size: Callable[[], int] | None) -> None:
    """A batch must be one its sampler could have yielded: its rows a multiple of the sampler's
    padding (over the ranks), its mask with it, no more rows than ``N``."""
    size = check_batch(batch)
    if sampling.row_multiple is not None:
        rows = size if world_size is None else size * world_size()  # a rank sees its shard
        if rows % sampling.row_multiple != 0:
            raise ValueError(
                f"the batch has {rows} rows{' over the ranks' if world_size else ''} but the sampler pads "
                f"every batch to a multiple of {sampling.row_multiple}: it does not come from this sampler"
            )
    if sampling.needs_mask and mask is None:
        raise fundp_guards.MissingMaskError("the sampler's batches are padded: pass step(..., mask=mask) with the mask it "
                                            "yields, or the batch as a fundp.data.Batch (fundp.data.gather)")
    if sampling.num_examples is not None and mask is None and size > sampling.num_examples:
        raise ValueError(f"the batch has {size} rows, more than num_examples={sampling.num_examples}")


def _clipped_sum_plan(loss_fn: Callable, physical_batch_size: Any, compile_chunk: Any, **options: Any) -> tuple[ClippedSumFn, ClippedSumFn]:
    """The data half of the plan: :func:`clipped_grad_sum`, accumulated over physical chunks when
    ``physical_batch_size`` is given (:func:`accumulate`).  Returns ``(summed, chunk function)``."""
    summed = clipped_grad_sum(loss_fn, **options)
    chunk_fn = summed
    if physical_batch_size is None:
        if compile_chunk:
            raise ValueError("compile_chunk needs physical_batch_size (it compiles the accumulation's chunk function)")
        return summed, chunk_fn
    physical_batch_size = check_int("physical_batch_size", physical_batch_size, minimum=1)
    if compile_chunk is True:
        chunk_fn = torch.compile(summed, dynamic=False)
    elif callable(compile_chunk):
        chunk_fn = compile_chunk(summed)
    elif compile_chunk is not False and compile_chunk is not None:
        raise TypeError("compile_chunk must be a bool or a callable applied to the chunk function")
    return accumulate(chunk_fn, physical_batch_size), chunk_fn


def _all_reduced(summed: ClippedSumFn, process_group: Any, settings: tuple, options: dict[str, Any],
                 tensor_parallel_dim: Any = None, reduction_slots: int | None = None) -> Callable[..., ClippedSum]:
    """Transform of a clipped-sum function for ``distributed=True``: each rank sums its shard
    (its model key folded with its rank: dropout differs, the noise key stays shared) and the
    sums are all-reduced (SUM), or reduce-scattered for sharded (FSDP2 / DTensor) params, whose
    leaves are gathered for the call (:func:`fundp.sharding.unshard`; ``options``: the step's
    settings that sharding refuses).  The ranks' rows are disjoint, so the sensitivity is kept.
    With ``tensor_parallel_dim`` the ranks of a tensor-parallel group share one batch (and one
    model key): each group's sum is counted once (:func:`fundp.sharding.reduce_clipped_sum`).
    The first call checks that every rank holds the same key, settings and params; every call's
    key and settings ride along in the collective (:func:`fundp.distributed.call_fingerprint`).
    With ``reduction_slots`` the rank sums its rows slot by slot
    (:func:`fundp.distributed.slotted_clipped_sum`, model key folded with the global slot) and the
    sums are added by the canonical tree (:func:`fundp.distributed.tree_reduce_clipped_sum`,
    :func:`fundp.sharding.tree_reduce_sharded_clipped_sum`): the same bits on any world size."""
    from fundp import distributed as fundp_distributed
    from fundp import sharding as fundp_sharding

    rank_check = fundp_distributed.first_call_check(settings, process_group)

    def reduced(params: Any, batch: Any, mask: Any, key: Any, *, max_norm: Any, step_key: torch.Tensor,
                per_call: tuple, fingerprint: tuple) -> ClippedSum:
        params, layout = fundp_sharding.unshard(params, process_group, key=step_key, batch=batch, mask=mask, options=options,
                                                tensor_parallel_dim=tensor_parallel_dim)
        rank_check(step_key, params=params, per_call=per_call)
        rank = fundp_sharding.data_rank(layout, process_group)
        call_fingerprint = fundp_distributed.call_fingerprint(step_key, fingerprint)
        if reduction_slots is not None:
            world_size = fundp_distributed.rank_and_world_size(process_group)[1]
            clipped = fundp_distributed.slotted_clipped_sum(summed, reduction_slots, rank, world_size)(
                params, batch, mask, key, max_norm=max_norm)
            total = fundp_distributed.tree_reduce_clipped_sum(clipped, process_group, fingerprint=call_fingerprint) \
                if layout is None else \
                fundp_sharding.tree_reduce_sharded_clipped_sum(clipped, layout, process_group, fingerprint=call_fingerprint)
            return total._replace(sensitivity=clipped.sensitivity)
        clipped = summed(params, batch, mask, fundp_random.fold_in(key, rank), max_norm=max_norm)
        if layout is None:
            total = fundp_distributed.all_reduce_clipped_sum(clipped, process_group, fingerprint=call_fingerprint)
        else:
            total = fundp_sharding.reduce_clipped_sum(clipped, layout, process_group, fingerprint=call_fingerprint)
        return total._replace(sensitivity=clipped.sensitivity)

    return reduced


def _privatizer_plan(noise_multiplier: Any, secure_mode: bool, noise_mechanism: Any) -> Any:
    """The noise half of the plan: i.i.d., secure or correlated (:mod:`fundp.privatizers`)."""
    from fundp import privatizers

    if noise_mechanism is not None:
        return privatizers.correlated_privatizer(noise_mechanism, noise_multiplier)
    if secure_mode:
        return privatizers.secure_gaussian_privatizer(noise_multiplier)
    return privatizers.gaussian_privatizer(noise_multiplier)


def _count_reduce(process_group: Any, counted: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``distributed=True``: adaptive clipping's unclipped count summed over the ranks (each counts its
    rows); ``counted=False``: this rank contributes 0 (a tensor-parallel group's other ranks, whose
    rows its first rank counts: :func:`fundp.sharding.counts_its_examples`)."""
    from fundp import distributed as fundp_distributed

    return lambda count: fundp_distributed.all_reduce_sum([count if counted else torch.zeros_like(count)], process_group)[0]


def _is_mf(noise_mechanism: Any) -> bool:
    """A :class:`fundp.mf.CorrelatedNoise`, whose state the sharded step lays out like the parameters."""
    from fundp.mf import CorrelatedNoise

    return isinstance(noise_mechanism, CorrelatedNoise)


def _amplified_or_foreign(noise_mechanism: Any) -> bool:
    """A mechanism whose count query cannot be accounted with it: cyclic Poisson (amplified), or
    not a :class:`fundp.mf.CorrelatedNoise` (its ``account`` knows no count)."""
    if noise_mechanism is None:
        return False
    from fundp.mf import CorrelatedNoise, CyclicPoisson

    return not isinstance(noise_mechanism, CorrelatedNoise) or isinstance(noise_mechanism.participation, CyclicPoisson)


def _schedule_refusal(noise_mechanism: Any) -> str | None:
    """Why a per-call ``noise_multiplier`` (a schedule) is not accounted with ``noise_mechanism``, or ``None``."""
    from fundp.mf import CorrelatedNoise

    if not isinstance(noise_mechanism, CorrelatedNoise):
        return f"a {type(noise_mechanism).__name__}, not a fundp.mf mechanism"
    return noise_mechanism.schedule_refusal()


def _sharding_dims(tensor_parallel_dim: Any, distributed: bool) -> tuple[str, ...] | None:
    """``tensor_parallel_dim`` checked (a mesh dim name or a tuple of them, with ``distributed=True``)."""
    from fundp.sharding import _tensor_parallel_dims

    dims = _tensor_parallel_dims(tensor_parallel_dim)
    if dims is not None and not distributed:
        raise ValueError("tensor_parallel_dim needs distributed=True (the ranks of a mesh share the step)")
    return dims


def _check_build(noise_multiplier: Any, flags: dict[str, Any]) -> Any:
    if isinstance(noise_multiplier, torch.Tensor):
        check_nonnegative("noise_multiplier", noise_multiplier)
        if not is_threshold_tensor(noise_multiplier):
            raise TypeError("noise_multiplier must be a number or a 0-d floating tensor")
    else:
        noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool")
    return noise_multiplier


def _call_settings(params: Any, clip_style: str, built_sigma: Any, max_norm: Any, noise_multiplier: Any,
                   adaptive_clipping: Any, clip_state: Any, noise_mechanism: Any, noise_state: Any) -> tuple[Any, Any]:
    """This call's ``(sigma, threshold)`` from the per-call overrides and the mechanisms' states (checked)."""
    sigma = built_sigma if noise_multiplier is None else _check_scalar("noise_multiplier", noise_multiplier)
    threshold = max_norm
    if threshold is not None:
        if clip_style == "per_layer" and not isinstance(threshold, (int, float, torch.Tensor)):
            per_layer_thresholds(threshold, params)
        elif not is_threshold_tensor(threshold):
            threshold = check_positive("max_norm", threshold)
    if adaptive_clipping is not None:
        if clip_state is None:
            raise ValueError("adaptive_clipping needs step(..., clip_state=cfg.init(initial_max_norm)); keep out.clip_state")
        if threshold is not None:
            raise ValueError("max_norm and clip_state both set the threshold: with adaptive_clipping pass clip_state only")
        threshold = clip_state.max_norm
    elif clip_state is not None:
        raise ValueError("clip_state is for dp_step(..., adaptive_clipping=...)")
    if noise_mechanism is not None:
        why = None if noise_multiplier is None else _schedule_refusal(noise_mechanism)
        if why is not None:
            raise fundp_guards.refusal(("noise_mechanism", "noise_multiplier (per call)"), why)
        if noise_state is None:
            raise ValueError("noise_mechanism needs step(..., noise_state=mechanism.init(params)); keep out.noise_state")
    elif noise_state is not None:
        raise ValueError("noise_state is for dp_step(..., noise_mechanism=...)")
    return sigma, threshold


def _reduction_plan(summed: ClippedSumFn, distributed: bool, process_group: Any, tensor_parallel_dim: Any,
                    reduction_slots: Any, noise_mechanism: Any, settings: tuple) -> tuple[Any, Any, Any]:
    """``(summed, reduced, world_size)``: the clipped-sum function (slotted with ``reduction_slots``
    in one process), its ``distributed=True`` transform (:func:`_all_reduced`, ``settings``
    compared across ranks) or ``None``, and ``world_size(params)`` (the ranks with rows of their
    own) or ``None``."""
    from fundp import distributed as fundp_distributed

    if reduction_slots is not None:
        reduction_slots = fundp_distributed.check_reduction_slots(reduction_slots)
        if tensor_parallel_dim is not None:
            from fundp.sharding import _SLOTS_WITH_TENSOR_PARALLEL

            raise NotImplementedError(_SLOTS_WITH_TENSOR_PARALLEL)
        if not distributed:
            summed = fundp_distributed.slotted_clipped_sum(summed, reduction_slots)
    if not distributed:
        return summed, None, None
    from fundp import sharding as fundp_sharding

    reduced = _all_reduced(summed, process_group, settings + (("reduction_slots", reduction_slots),),
                           {"noise_mechanism": noise_mechanism is not None and not _is_mf(noise_mechanism)},
                           tensor_parallel_dim, reduction_slots)
    return summed, reduced, lambda params: fundp_sharding.data_world_size(params, process_group, tensor_parallel_dim)


def _count_query(quantile: Any, adaptive_clipping: Any, expected_batch_size: Any, process_group: Any, params: Any,
                 tensor_parallel_dim: Any) -> Any:
    """Adaptive clipping's count privatizer for one call: under tensor parallelism a TP group's
    ranks count the same rows, so only its first rank's count enters the sum
    (:func:`fundp.sharding.counts_its_examples`)."""
    if quantile is None or tensor_parallel_dim is None:
        return quantile
    from fundp.sharding import counts_its_examples

    if counts_its_examples(params, tensor_parallel_dim):
        return quantile
    return quantile_privatizer(adaptive_clipping, expected_batch_size, reduce_count=_count_reduce(process_group, False))


def _one_draw_per_coordinate(grads: Any, process_group: Any) -> Any:
    """Secure mode with ``distributed=True``: each coordinate keeps its first holder's OS-entropy draw
    (rank 0's when replicated; the owner's, first replica's, when sharded)."""
    from fundp import distributed as fundp_distributed
    from fundp import sharding as fundp_sharding

    if fundp_sharding.is_sharded(grads):
        return fundp_sharding.broadcast_replicas(grads, process_group)
    return fundp_distributed.broadcast_from_rank0(grads, process_group)


def _checked_batch(sampling: Any, batch: Any, mask: Any, noise_mechanism: Any, check_padding: bool,
                   looked_for_padding: list, world_size: Callable[[], int] | None) -> tuple[Any, Any]:
    """The step's ``(batch, mask)`` (a :class:`fundp.data.Batch` unpacked) after the sampling guards:
    rows against the sampler, the batch's sampler against the step's (a ``Batch`` value's also
    when traced), and, eagerly, a padded or repeated-row batch without its mask refused
    (``looked_for_padding``: non-empty once an unmasked batch was looked at)."""
    batch, mask, source = _intake(batch, mask)
    _check_batch_rows(sampling, batch, mask, world_size)
    if source is not None:
        _check_batch_source(sampling, source, noise_mechanism)
    elif not torch.compiler.is_compiling():
        _check_batch_source(sampling, fundp_guards.mask_source(mask), noise_mechanism)
        if mask is None:
            fundp_guards.refuse_padded_without_mask(batch)
            if check_padding:
                fundp_guards.refuse_repeated_rows_without_mask(batch, first_call=not looked_for_padding)
                looked_for_padding.append(True)
    return batch, mask


def dp_step(
    loss_fn: Callable,
    *,
    max_norm: Any,
    noise_multiplier: Any,
    expected_batch_size: float | None = None,
    sample_rate: float | None = None,
    clip_style: ClipStyle = "flat",
    gamma: float = 0.01,
    grad_method: GradMethod = "auto",
    has_aux: bool = False,
    randomness: Randomness = "error",
    verify: Verify = "first",
    check_batch_consistency: bool = True,
    check_finite: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    tensor_parallel_dim: str | tuple[str, ...] | None = None,
    secure_mode: bool = False,
    budget: Any = None,
    physical_batch_size: int | None = None,
    compile_chunk: bool | Callable = False,
    sampler: Any = None,
    num_examples: int | None = None,
    check_key_reuse: bool = True,
    adaptive_clipping: Any = None,
    noise_mechanism: Any = None,
    check_padding: bool = True,
    reduction_slots: int | None = None,
) -> Step:
    """Transform: returns a stateless DP-SGD step.

    ``step(params, batch, key, *, ledger=None, mask=None, max_norm=None, noise_multiplier=None,
    clip_state=None, noise_state=None) -> StepResult``

    ``batch`` is a pytree of tensors of ``B`` rows with ``mask`` (``BoolTensor[B]``, default all
    real), or a :class:`fundp.data.Batch` (:func:`fundp.data.gather`, :func:`fundp.data.poisson_loader`),
    which carries its mask (``mask=`` as well is refused) and its sampler (checked against the step).

    Args:
      loss_fn: ``loss_fn(params, batch) -> Tensor[B]`` per-example losses.
      max_norm: clipping threshold ``C`` (a pytree of thresholds for ``clip_style="per_layer"``):
        a number or a 0-d tensor.  ``step(..., max_norm=t)`` overrides it per call.
      noise_multiplier: ``sigma``; the noise std on the clipped sum is ``sigma * S`` with ``S`` the
        sensitivity the clipped sum carries.  0 gives a non-private step.  A number or a 0-d
        tensor; ``step(..., noise_multiplier=t)`` overrides it per call.  Pass 0-d tensors for
        schedules: ``torch.compile`` traces them, so changing their value never recompiles
        (Python floats are specialised: a new value is a new graph).
      expected_batch_size: ``sample_rate * N``, the divisor of the noisy sum (taken from
        ``sampler`` or ``sample_rate * num_examples`` when omitted).
      sample_rate: Poisson rate ``q`` recorded in the ledger (required when a ledger is passed).
      clip_style: ``"flat"`` (default), ``"per_layer"`` or ``"automatic"``.
      gamma: stability constant of automatic clipping.
      grad_method: per-example-norm engine, ``"vmap"``, ``"ghost"`` or ``"auto"``.
      has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` (per-example, ``[B, ...]``) comes
        back in ``.aux``.
      randomness: ``"different"`` for models with dropout (driven by ``key``).
      verify: ``"first"`` (default), ``"always"`` or ``False``: when the engine checks its fast
        path against single-example gradients (see :mod:`fundp.engines`).
      check_batch_consistency: on every call of the ghost path (``"auto"``/``"ghost"``), one extra
        forward (no backward) of a random quarter of the batch, in random order: each of its losses
        must equal the same example's loss in the batch, or
        :class:`~fundp.engines.ghost.BatchConsistencyError` is raised.  Catches examples coupled
        by code the tracer cannot see (``torch.jit``, extension ops) on any call, not only the
        verified first one.  With dropout (``randomness="different"``) each example's masks are
        keyed by its row, so the subset sees the batch's masks; skipped only for a run with a
        random op not keyed per example (:mod:`fundp.engines.ghost._keyed_dropout`).  See
        :mod:`fundp.engines.ghost._consistency` (tolerances, cost, what it cannot see).
      check_finite: debug mode: raise ``FloatingPointError`` when params or a real example's
        loss are NaN/Inf (synchronises with the device; off by default).
      distributed: inside an initialised ``torch.distributed`` group, each rank passes its shard
        of the global batch; clipped sums are all-reduced (SUM) and every rank adds the same
        noise from the same key, so all ranks hold identical gradients equal to one process on
        the whole batch.  ``expected_batch_size`` is the *global* one.  The first call checks
        that every rank holds the same key, settings and params
        (:func:`fundp.distributed.first_call_check`).  See :mod:`fundp.distributed`.
      process_group: the group for ``distributed=True`` (default: the world).
      tensor_parallel_dim: with ``distributed=True`` and parameters sharded by tensor parallelism
        (``parallelize_module``, alone or under ``fully_shard``): the name(s) of the
        ``DeviceMesh`` dims along which ranks share a batch (e.g. ``"tp"`` of a
        ``("dp", "tp")`` mesh).  The ranks of each tensor-parallel group pass the same rows;
        groups pass their own (checked on every call); each group's clipped sum is counted once.
        See :mod:`fundp.sharding`.
      secure_mode: draw the noise from OS entropy with the hardened sampler of
        :mod:`fundp.secure` (for production; slower, not reproducible from the key, and a graph
        break under ``torch.compile``).  With ``distributed=True`` only rank 0's draw is used;
        with sharded params each coordinate's draw is its owner's (the first replica's under
        HSDP: :func:`fundp.sharding.broadcast_replicas`), no rank drawing more than its block.
      budget: ``fundp.Budget(epsilon, delta)`` or ``(epsilon, delta)``: a step whose ledger
        would exceed it raises :class:`fundp.BudgetExceededError` before touching the data.
      physical_batch_size: gradient accumulation: the logical batch is processed in chunks of
        exactly this many rows (:func:`accumulate`), their clipped sums added, then noised and
        divided once.  Pad logical batches to a multiple of it.
      compile_chunk: with ``physical_batch_size``: ``True`` compiles the chunk function with
        ``torch.compile(dynamic=False)`` (one physical shape, one compilation); a callable is
        applied to it instead.
      sampler: the :class:`fundp.data.PoissonBatches` / ``PoissonBatchSampler`` /
        ``poisson_loader`` the batches come from.  ``sample_rate`` and ``expected_batch_size``
        default to its values and are checked against it (``ValueError`` on a mismatch;
        shuffled batches are refused); every call then refuses a batch whose row count is not a
        multiple of its ``pad_to_multiple`` or that comes without its mask.
      num_examples: ``N``: ``expected_batch_size`` defaults to (and must equal)
        ``sample_rate * N``; a batch of more than ``N`` rows without a mask is refused.
      check_key_reuse: on by default: a key already used by *any* step of this process is refused
        with :class:`fundp.guards.KeyReuseError` (a ``ValueError``; the same key repeats the noise
        bit for bit).  Derive one key per step (``fundp.random.fold_in(key, t)``, or
        :func:`fundp.train_step`, which splits its key every step).  The check reads the key's two
        words on the host (no device sync for a CPU key, the default) and stays in the compiled
        graph as one custom op (``torch.compile(step, fullgraph=True)`` works); an eager call
        that raises leaves its key unused.  Opt out explicitly with ``False`` (e.g. to compare two
        steps on one key); :func:`fundp.guards.forget_keys` starts a new key scope.  A noiseless
        call (``noise_multiplier`` a plain 0, no adaptive clipping) is not checked: it adds no
        noise a repeated key could cancel.
      adaptive_clipping: a :class:`fundp.adaptive.QuantileClipping` config: ``max_norm`` then
        comes from ``step(..., clip_state=cfg.init(C0))`` and the updated state is returned in
        ``out.clip_state``; the noisy count of unclipped examples uses its own key and the ledger
        records the combined mechanism (:func:`fundp.adaptive.ledger_noise_multiplier`).  With
        ``distributed=True`` the exact counts of the ranks' rows are summed before the noise is
        added, once: every rank keeps the same clip state, equal to one process's.
      noise_mechanism: a correlated-noise mechanism (``init(params) -> state``,
        ``sample(state, key, stddev, like) -> (noise, state)``, e.g. from :mod:`fundp.mf`):
        its noise replaces the i.i.d. draw; ``step(..., noise_state=mech.init(params))`` and
        ``out.noise_state`` carry its state.  A ledger records each step with the mechanism's
        participation schema (``mech.account``, a :class:`fundp.accounting.CorrelatedNoiseSteps`
        event; with adaptive clipping the count too, for single-participation and min-separation
        mechanisms), so ``fundp.epsilon(out.ledger, delta)`` is its epsilon; a mechanism without
        ``account`` refuses a ledger.  With sharded (FSDP2 / DTensor) params, ``mech.init(params)``
        of a :mod:`fundp.mf` mechanism keeps only each rank's own coordinates of the buffers
        (DTensors laid out like the params) and each rank draws and updates only those
        (:func:`fundp.sharding.on_local_blocks`); other mechanisms are refused there.
      check_padding: on by default: an eager call with a raw batch and no ``mask=`` whose last two
        rows are equal in every leaf (as the padding rows of fundp's samplers, copies of example 0,
        are) is refused with :class:`fundp.guards.MissingMaskError`: without its mask each padding
        row would count as a real example.  Pass the mask, or the batch as a
        :class:`fundp.data.Batch`; opt out explicitly with ``False`` only where the data
        legitimately repeats rows and every row is a real example.  Reads two rows per leaf: on
        every call for CPU tensors, on the first unmasked call only for accelerator tensors (a
        device sync); not inside ``torch.compile``.
      reduction_slots: ``S``, a power of two (default ``None``: one sum per rank, all-reduced).
        Makes the clipped sum the same bits on every world size ``W`` (a power of two dividing
        ``S``), one process included, so a run resumed onto another world size
        (:mod:`fundp.sharded_checkpoint`) continues bit for bit.  The global batch is cut into
        ``S`` slots, slot ``s`` holding the global rows ``i = s (mod S)`` (with
        :func:`fundp.distributed.shard`, rank ``r`` holds the slots ``s = r (mod W)``); each slot's
        clipped sum is one call of the engine on its rows (and, with ``physical_batch_size``, its
        chunks of them; model key folded with ``s``), and the slot sums are added by one fixed
        binary tree, the last ``log2(W)`` levels across ranks by recursive doubling
        (:func:`fundp.distributed.tree_reduce_clipped_sum`).  Pad the *global* batch to a
        multiple of ``S`` (masked rows) before sharding it; each rank's batch must have a
        multiple of ``S / W`` rows.  Cost: ``S / W`` engine calls per rank of ``B / S`` rows each,
        and ``log2(W)`` full-size exchanges instead of one all-reduce.  Not with
        ``tensor_parallel_dim``.  Bit-identity also needs the same hardware, thread count,
        library versions and execution mode (``torch.compile`` fuses differently from eager): it
        removes only the dependence on the world size.

    The step computes ``StepResult(grads, ledger, loss, norms, num_nonfinite, aux, clip_state,
    noise_state)`` with ``grads = (sum_i c_i g_i + N(0, (sigma S)^2)) / expected_batch_size``.
    Only ``grads``, ``ledger`` and the states are private: see :class:`~fundp.types.StepResult`.
    ``key`` is split into a noise key and a model key; the same key gives the same result.

    ``torch.compile(step)`` works and does not recompile across steps of one batch shape;
    ``torch.compile(step, fullgraph=True)`` works when no ledger or budget is used (those run in a
    small function outside the graph, before it); the key-reuse check is one custom op inside it.

    Guards (see :mod:`fundp.guards`, which also holds the table of refused combinations):
    ``ledger`` and ``mask`` are keyword-only; a ledger that a completed call of *any* step already
    recorded on (the caller forgot ``ledger = out.ledger``) is refused; a call that raises does
    not consume its ledger (continue with the same one); a reused key is refused; params that
    require grad are detached (one warning), so no autograd graph grows across steps.  Sampling
    assumptions come from the sampler: the masks fundp's samplers yield are tagged with their
    sampler, and an eager call refuses a batch whose mask's sampler contradicts the step (another
    sampler than ``sampler=``, another ``sample_rate`` or ``expected_batch_size``, truncated
    batches without ``sampler=``, shuffled batches for Poisson accounting, Poisson batches for a
    ``noise_mechanism``), also when the step was built without ``sampler=``.  Without
    ``sampler=``, a raw batch passed without a mask is looked at: equal last two rows (as the
    padding of Poisson batches) are refused (``check_padding``).  A :class:`fundp.data.Batch`'s
    sampler is checked eagerly and under ``torch.compile`` alike.

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> batch = {"x": torch.eye(2), "y": torch.zeros(2)}
      >>> step({"w": torch.tensor([3.0, 0.1])}, batch, fundp.random.key(0)).grads["w"]
      tensor([0.5000, 0.1000])
    """
    noise_multiplier = _check_build(noise_multiplier, {"check_finite": check_finite, "distributed": distributed,
                                                       "secure_mode": secure_mode, "check_key_reuse": check_key_reuse,
                                                       "check_padding": check_padding})
    sampling = _sampling_plan(sampler, sample_rate, expected_batch_size, num_examples, noise_mechanism)
    if budget is not None:
        from fundp.budget import _as_budget

        budget = _as_budget(budget)
        if sampling.sample_rate is None:
            raise ValueError("budget needs sample_rate: pass dp_step(..., sample_rate=q)")
    privatizer = _privatizer_plan(noise_multiplier, secure_mode, noise_mechanism)
    fundp_guards.check_combination({
        "adaptive_clipping": adaptive_clipping is not None, "distributed": distributed, "secure_mode": secure_mode,
        "clip_style=per_layer": clip_style == "per_layer", "budget": budget is not None,
        "noise_mechanism": noise_mechanism is not None,
    }, accepted=() if _amplified_or_foreign(noise_mechanism) else (("adaptive_clipping", "noise_mechanism"),))
    quantile = None if adaptive_clipping is None else quantile_privatizer(
        adaptive_clipping, sampling.expected_batch_size, reduce_count=_count_reduce(process_group) if distributed else None)
    summed, chunk_fn = _clipped_sum_plan(
        loss_fn, physical_batch_size, compile_chunk, max_norm=max_norm, clip_style=clip_style, gamma=gamma,
        grad_method=grad_method, has_aux=has_aux, randomness=randomness, verify=verify,
        check_batch_consistency=check_batch_consistency, check_finite=check_finite)
    tensor_parallel_dim = _sharding_dims(tensor_parallel_dim, distributed)
    summed, reduced, world_size = _reduction_plan(
        summed, distributed, process_group, tensor_parallel_dim, reduction_slots, noise_mechanism, (
            ("max_norm", max_norm), ("noise_multiplier", noise_multiplier), ("expected_batch_size", sampling.expected_batch_size),
            ("sample_rate", sampling.sample_rate), ("clip_style", clip_style), ("gamma", gamma), ("grad_method", grad_method),
            ("physical_batch_size", physical_batch_size), ("secure_mode", secure_mode), ("adaptive_clipping", adaptive_clipping),
            ("tensor_parallel_dim", tensor_parallel_dim)))
    built_sigma, built_threshold = noise_multiplier, max_norm
    looked_for_padding: list[bool] = []  # non-empty once an eager unmasked batch was looked at

    def step(params: Any, batch: Any, key: torch.Tensor, *, ledger: Any = None, mask: torch.Tensor | None = None,
             max_norm: Any = None, noise_multiplier: Any = None, clip_state: Any = None, noise_state: Any = None) -> StepResult:
        sigma, threshold = _call_settings(params, clip_style, built_sigma, max_norm, noise_multiplier,
                                          adaptive_clipping, clip_state, noise_mechanism, noise_state)
        batch, mask = _checked_batch(sampling, batch, mask, noise_mechanism, check_padding, looked_for_padding,
                                     None if world_size is None else lambda: world_size(params))
        params = detach_params(params)
        spent = privatizer.event(noise_state, noise_multiplier=sigma)
        if noise_multiplier is not None and noise_mechanism is not None:  # a schedule: recorded step by step
            spent = spent._replace(scheduled=True)
        events = (spent,) + (() if quantile is None else (quantile.event(clip_state),))
        new_ledger = None if ledger is None and budget is None else _before_step(ledger, budget, events, sampling)
        # A key used by any step of the process is refused; a noiseless step (sigma a plain 0, no
        # adaptive count noise) adds no noise that a repeated key could cancel, so it is not checked.
        guard_key = check_key_reuse and not (quantile is None and isinstance(sigma, (int, float)) and sigma == 0)
        key = fundp_guards.claimed(key) if guard_key else key
        noise_key, model_key, count_key = fundp_random.split(key, 3)
        if reduced is None:
            clipped = summed(params, batch, mask, model_key, max_norm=threshold)
        else:
            clipped = reduced(
                params, batch, mask, model_key, max_norm=threshold, step_key=key,
                per_call=(("ledger", ledger), ("max_norm (call)", max_norm), ("noise_multiplier (call)", noise_multiplier)),
                fingerprint=(("noise_multiplier", sigma), ("max_norm", built_threshold if threshold is None else threshold),
                             ("ledger steps", None if ledger is None else ledger.steps)))
        noisy, new_noise_state, _ = privatizer.privatize(clipped, clipped.sensitivity, noise_key, noise_state, noise_multiplier=sigma)
        grads = _normalise(noisy, sampling.expected_batch_size, clipped.dtypes)
        if distributed and secure_mode:
            grads = _one_draw_per_coordinate(grads, process_group)
        count_query = _count_query(quantile, adaptive_clipping, sampling.expected_batch_size, process_group, params,
                                   tensor_parallel_dim)
        new_clip_state = None if count_query is None else count_query.privatize((clipped.norms, mask), 1, count_key, clip_state)[1]
        loss = clipped.loss_sum / torch.clamp_min(clipped.num_examples, 1).to(clipped.loss_sum.dtype)
        if ledger is not None:
            _after_step(ledger)  # the step completed: its ledger is now consumed, process-wide
        if guard_key:
            fundp_guards.record_key(key)  # eagerly, the key counts as used once the step completed
        return StepResult(grads, new_ledger, loss, clipped.norms, clipped.num_nonfinite, clipped.aux, new_clip_state, new_noise_state)

    step.sample_rate = sampling.sample_rate  # type: ignore[attr-defined]
    step.max_norm = max_norm  # type: ignore[attr-defined]  # read by fundp.audit (canary strength)
    step.expected_batch_size = sampling.expected_batch_size  # type: ignore[attr-defined]
    step.physical_batch_size = physical_batch_size  # type: ignore[attr-defined]
    step.chunk_fn = chunk_fn  # type: ignore[attr-defined]
    return step
