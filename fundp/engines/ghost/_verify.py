"""The verification pass: the ghost path checked against independent gradients, on real data.

``dp_step(..., verify="first")`` (the default) runs it on the first call for each new input
signature (batch shapes and dtypes, parameter shapes); ``"always"`` on every call; ``False`` never.
It runs eagerly and checks two things (under ``torch.compile`` it is one opaque op of the graph,
``fundp::ghost_verify``, see :func:`verify_in_graph`, which runs it eagerly and compares the
compiled losses and norms with the verified ones row by row):

1. **The whole decomposition, for every example at once.**  With random weights
   ``w_i ~ U[1/2, 3/2]``, the engine's book-keeping sum ``sum_i w_i g_i`` (its ``weighted_sum`` —
   the very code that forms the clipped sum) must equal the true gradient of
   ``sum_i w_i L_i`` computed by plain autograd through the parameters.  A parameter use the
   tracer did not attribute (``torch.jit``, a custom ``autograd.Function``, an extension), rows
   attributed to the wrong example (a reordering, a layout misread), or examples that interact
   make the two differ for almost every ``w`` (the difference is a non-zero linear function of
   ``w``), so they are caught with probability one.
2. **Norms and losses of single examples.**  For two real examples, the engine's per-parameter
   squared norms and the batched forward's losses must equal those of the example run alone
   (micro-batching): this checks the norm formulas themselves and catches interaction that
   changes the forward (batch statistics).

Cost: one forward and backward of the batch plus two of a single example — about one
non-private step, once per input signature.  Tolerances (relative to the global gradient norm):
``1e-7`` in float64, ``1e-3`` in float32, ``5e-2`` when the parameters are 16-bit or autocast is on.
With ``randomness="different"`` (dropout) each run of ``loss_fn`` draws each example's masks
keyed by its row in the step's batch (:mod:`._keyed_dropout`): the kept rows (check 1) and single
examples (check 2) see the batch's masks, and both checks run.  When the engine's run had a random
draw not keyed per example (``torch.rand``, a dropout of a sequence-first tensor) only check 1 runs,
with the same draws: rows left out (masked, non-finite) are then replaced by a copy of a kept row,
so that the batch keeps its shape and its draws.  A signature is recorded as verified only when
something was checked.

When ``loss_fn`` reads a Python value from batch data (``int(lengths.max())``, ``.item()``,
``bool(mask.any())``: the tracer's ``data_dependent``), every call is verified, and check 2 also
compares the batched losses of up to 16 random examples alone and of two random halves of the batch.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import weakref
from typing import Any, Callable

import optree
import torch

from fundp.engines.ghost._layout import ExamplesInteractError

__all__ = ["GhostVerificationError", "verify_engine", "tolerance"]


class GhostVerificationError(RuntimeError):
    """The ghost path's per-example gradients disagree with single-example gradients.

    Raised by the engine's ``verify`` check (see the module docstring); a ``RuntimeError``.

    Example:
      >>> from fundp.engines.ghost import GhostVerificationError
      >>> try:
      ...     raise GhostVerificationError("params['w']: ghost and single-example gradients differ")
      ... except RuntimeError as error:
      ...     print(type(error).__name__)
      GhostVerificationError
    """


def tolerance(leaves: list) -> float:
    dtypes = {leaf.dtype for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}
    autocast = any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda") if _has_autocast(device))
    if autocast or dtypes & {torch.float16, torch.bfloat16}:
        return 5e-2
    if dtypes == {torch.float64}:
        return 1e-7
    return 1e-3


def _has_autocast(device: str) -> bool:
    try:
        torch.is_autocast_enabled(device)
        return True
    except (TypeError, RuntimeError):
        return False


def _plain(sq: Any) -> torch.Tensor:
    """A ``[B]`` float64 squared norm from a plain tensor or a ``ScaledSqNorm``."""
    if hasattr(sq, "scale"):
        return sq.scale.double().square() * sq.scaled.double()
    return sq.double()


def _take(batch: Any, rows: torch.Tensor) -> Any:
    return optree.tree_map(lambda leaf: leaf.index_select(0, rows.to(leaf.device)), batch)


def _flat_norm(tensors: list) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors if t is not None))


def verify_engine(
    loss_fn: Callable,
    leaves: list,
    treespec: Any,
    batch: Any,
    key: Any,
    sq_norms: list,
    losses: torch.Tensor,
    weighted_sum: Callable[[list], list],
    names: list,
    has_aux: bool,
    randomness: str,
    rng: Callable,
    thorough: bool = False,
    seed: int = 0,
    keyed: bool = False,
) -> bool:
    """Raises :class:`GhostVerificationError` (or :class:`ExamplesInteractError`) when the engine's
    per-example gradients are not those of single examples.

    Returns whether anything was checked (``False`` only when no example has a finite loss and
    gradient): a signature is recorded as verified only then.  ``thorough`` (``loss_fn`` read a
    Python value from the batch, so each call may compute differently): the losses of up to 16
    examples run alone (drawn with ``seed``) and of the two halves of the batch must equal the
    batched losses as well.  ``rng(key, batch, randomness, rows)``: the context each run of
    ``loss_fn`` on the rows ``rows`` of the step's batch gets (:func:`~._keyed_dropout.keyed_randomness`);
    ``keyed``: whether the engine's run drew its random values per example (dropout masks keyed by
    the row), so that a part of the batch, or one example, sees the same draws.
    """
    size = losses.shape[0]
    total = torch.zeros(size, dtype=torch.float64, device=losses.device)
    sq_norms = [_plain(sq) for sq in sq_norms]
    for sq in sq_norms:
        total = total + sq
    keep = torch.isfinite(total) & torch.isfinite(losses.double())
    if not bool(keep.any()):
        return False
    tol = tolerance(leaves)
    generator = torch.Generator().manual_seed(20261129)
    weights_cpu = 0.5 + torch.rand(size, generator=generator, dtype=torch.float64)
    weights = torch.where(keep, weights_cpu.to(losses.device), torch.zeros((), dtype=torch.float64, device=losses.device))
    proxies = [leaf.detach().requires_grad_() if leaf.is_floating_point() else leaf for leaf in leaves]
    differentiable = [i for i, p in enumerate(proxies) if isinstance(p, torch.Tensor) and p.requires_grad]
    rows = keep.nonzero().flatten()
    all_rows = bool(keep.all())
    sub_rows = None if all_rows else rows
    if randomness != "error" and not all_rows and not keyed:
        # Draws not keyed per example depend on the batch shape: a sub-batch would see other draws.  Instead
        # the rows left out are replaced by a copy of a kept row (same shape, same draws) with weight 0.
        source = torch.where(keep, torch.arange(size, device=keep.device), rows[0])
        sub_batch, sub_weights, sub_rows = _take(batch, source), weights, None
    else:
        sub_batch = batch if all_rows else _take(batch, rows)
        sub_weights = weights if all_rows else weights.index_select(0, rows)
    with torch.enable_grad(), rng(key, sub_batch, randomness, sub_rows):
        out = loss_fn(optree.tree_unflatten(treespec, proxies), sub_batch)
        sub_losses = out[0] if has_aux else out
        weighted = (sub_losses.double() * sub_weights).sum()
    if all_rows:
        _check_same_losses(losses, sub_losses.detach(), tol)
    truth = list(torch.autograd.grad(weighted, [proxies[i] for i in differentiable], allow_unused=True))
    truth_by_leaf: list = [None] * len(leaves)
    for i, grad in zip(differentiable, truth):
        truth_by_leaf[i] = torch.zeros_like(proxies[i]) if grad is None else grad
    engine_sums = weighted_sum([weights] * len(leaves))
    scale = _flat_norm(truth_by_leaf) + 1e-30
    for i in differentiable:
        error = _flat_norm([engine_sums[i].double() - truth_by_leaf[i].double()])
        if error > tol * scale:
            raise GhostVerificationError(
                f"the ghost engine's per-example gradients for {names[i]} do not match autograd: "
                f"|sum_i w_i g_i - grad(sum_i w_i L_i)| = {error:.3g} vs |grad| = {scale:.3g} (tolerance {tol:g}). "
                "Some use of this parameter or some row of the batch is not what the engine assumed "
                "(code the tracer cannot see, examples reordered, or examples that interact). "
                "Use grad_method='vmap', or report the model.")
    if randomness != "error" and not keyed:
        return True  # a single example would draw other random values than in the batch
    if thorough:
        _check_losses_alone(loss_fn, proxies, treespec, batch, key, losses, rows, has_aux, tol, seed, randomness, rng)
    checked = [int(rows[0])] + ([int(rows[-1])] if rows.numel() > 1 else [])
    for row in checked:
        index = torch.tensor([row], device=rows.device)
        one = _take(batch, index)
        with torch.enable_grad(), rng(key, one, randomness, index):
            out = loss_fn(optree.tree_unflatten(treespec, proxies), one)
            single = (out[0] if has_aux else out).reshape(-1)[0]
        grads = torch.autograd.grad(single, [proxies[i] for i in differentiable], allow_unused=True)
        batched_loss, single_loss = float(losses[row]), float(single.detach())
        if abs(single_loss - batched_loss) > tol * (abs(single_loss) + 1e-12) + 1e-12:
            raise ExamplesInteractError(
                f"example {row}'s loss is {batched_loss:.6g} in the batch but {single_loss:.6g} alone: the "
                "examples of a batch interact inside loss_fn (batch statistics, a reduction over the batch), so "
                "per-example gradients and DP-SGD's guarantee do not apply")
        true_sq = {i: (0.0 if g is None else float(g.double().square().sum())) for i, g in zip(differentiable, grads)}
        global_sq = sum(true_sq.values()) + 1e-300
        for i in differentiable:
            got = float(sq_norms[i][row])
            if abs(math.sqrt(max(got, 0.0)) - math.sqrt(true_sq[i])) > tol * math.sqrt(global_sq) + 1e-150:
                raise GhostVerificationError(
                    f"the ghost engine's per-example norm of {names[i]} for example {row} is {math.sqrt(max(got, 0)):.6g}, "
                    f"but the example alone gives {math.sqrt(true_sq[i]):.6g} (tolerance {tol:g} of the global norm "
                    f"{math.sqrt(global_sq):.6g}). Use grad_method='vmap', or report the model.")
    return True


def _check_same_losses(losses: torch.Tensor, again: torch.Tensor, tol: float) -> None:
    """The same batch (with the same keyed draws) run through ``loss_fn`` a second time must give the
    same losses; otherwise every comparison after it would blame a parameter for what is a change of
    state between the two forwards."""
    if again.numel() != losses.numel():
        return
    first, second = losses.double(), again.double().reshape(losses.shape)
    finite = torch.isfinite(first) & torch.isfinite(second)
    differ = finite & ((first - second).abs() > tol * (first.abs() + second.abs()) + 1e-12)
    if bool(differ.any()):
        row = int(differ.nonzero()[0, 0])
        raise GhostVerificationError(
            f"loss_fn gave example {row} the loss {float(first[row]):.6g} on the batch forward and "
            f"{float(second[row]):.6g} on the same batch again (with the same random draws): it changes state "
            "between calls (a buffer or counter updated in forward, a running statistic, BatchNorm in train mode "
            "with track_running_stats, a Python-side counter), so the single-example reruns that check the "
            "per-example gradients see another model. Make the forward pure: update such state outside the step, "
            "or put those modules in eval mode")


def _check_losses_alone(loss_fn, proxies, treespec, batch, key, losses, rows, has_aux, tol, seed, randomness,
                        rng) -> None:
    """The batched losses of up to 16 kept examples (drawn at random) and of each half of the kept
    rows (split at random) must equal their losses alone / in the half: a loss that depends on other
    examples through a Python value read from the batch (``int(lengths.max())``) differs."""
    generator = torch.Generator().manual_seed(20261206 + seed)
    shuffled = rows.cpu()[torch.randperm(rows.numel(), generator=generator)].to(rows.device)
    groups = [shuffled[i:i + 1] for i in range(min(16, shuffled.numel()))]
    if shuffled.numel() >= 4:
        half = shuffled.numel() // 2
        groups += [shuffled[:half].sort().values, shuffled[half:].sort().values]
    params = optree.tree_unflatten(treespec, [p.detach() if isinstance(p, torch.Tensor) else p for p in proxies])
    for group in groups:
        part = _take(batch, group)
        with torch.no_grad(), rng(key, part, randomness, group):
            out = loss_fn(params, part)
        alone = (out[0] if has_aux else out).detach().double().reshape(-1)
        batched = losses.double().index_select(0, group)
        if alone.shape != batched.shape or bool(((alone - batched).abs() > tol * (alone.abs() + 1e-12) + 1e-12).any()):
            which = f"example {int(group[0])}" if group.numel() == 1 else f"{group.numel()} examples"
            raise ExamplesInteractError(
                f"the losses of {which} differ in the batch and alone ({batched.tolist()[:4]} vs {alone.tolist()[:4]}): "
                "loss_fn reads a Python value from the batch (int(), .item(), bool(), .tolist()) and computes "
                "differently for other examples, so the examples of a batch interact and per-example gradients "
                "(DP-SGD's guarantee) do not apply. Compute such values per example, or with tensor ops only.")



# --- In the graph: the first call's verification as one opaque op ----------------------------------
#
# Under ``torch.compile`` a call of a ``torch.compiler.disable``-d function is a graph break, and
# dynamo keeps the split it made on the first call: a step whose first call left the graph to be
# verified ran as four graphs on every later call.  Instead the compiled engine hands its inputs and
# its outputs (losses, squared norms) to the custom op ``fundp::ghost_verify``: one node of the
# graph (no break, no guard on Python state), which runs eagerly each time the graph runs.  It
# returns copies of the outputs, which the step then uses, so the op can be neither dropped nor
# moved after the clipping.  At run time the op looks the signature up: verified, it returns at
# once (a dictionary look-up); not yet verified, it runs the engine eagerly with its verification
# and compares the compiled losses and norms with the verified ones, row by row.

_VERIFIERS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


class InGraphVerifier:
    """``verifier(layout, inputs, outputs)`` checks a compiled call at run time (see
    :func:`verify_in_graph`); registered under :attr:`number`, the only thing the graph holds of it
    (weakly: an engine that is gone lets it go).

    ``check(tree, outputs) -> bool`` raises when the call is wrong and returns whether its
    signature is now verified for good; such input shapes are remembered, so that later calls
    return after one set look-up (no tree rebuilt).
    """

    def __init__(self, check: Callable[[Any, list], bool]) -> None:
        self.check = check
        self.number = next(_NUMBERS)
        self.passed: set = set()
        _VERIFIERS[self.number] = self

    def __call__(self, layout: str, inputs: list, outputs: list) -> None:
        shapes = (layout,) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        if shapes in self.passed:
            return
        if self.check(rebuild(layout, inputs), outputs):
            self.passed.add(shapes)


def describe(tree: Any, tensors: list) -> str | None:
    """A Python literal for ``tree`` whose tensors are appended to ``tensors`` (``('t', index)``);
    ``None`` for a tree of other containers (a namedtuple, a dataclass) or leaves.

    Dicts, lists, tuples, tensors, ``None``, booleans, numbers and strings only: while dynamo
    traces, every step of this function is folded to a constant (the string is a constant of the
    graph); :func:`rebuild` reads it back at run time.

    Example:
      >>> import torch
      >>> tensors = []
      >>> describe({"x": torch.ones(2), "n": 3}, tensors), len(tensors)
      ("('d',(('x',('t',0)),('n',('c',3)),))", 1)
    """
    if isinstance(tree, torch.Tensor):
        tensors.append(tree.detach())
        return "('t'," + str(len(tensors) - 1) + ")"
    if tree is None or type(tree) in (bool, int, str) or (type(tree) is float and math.isfinite(tree)):
        return "('c'," + repr(tree) + ")"
    if type(tree) is dict:
        parts = []
        for name, value in tree.items():
            inner = describe(value, tensors) if type(name) in (str, int) else None
            if inner is None:
                return None
            parts.append("(" + repr(name) + "," + inner + "),")
        return "('d',(" + "".join(parts) + "))"
    if type(tree) in (list, tuple):
        parts = []
        for value in tree:
            inner = describe(value, tensors)
            if inner is None:
                return None
            parts.append(inner + ",")
        return "(" + ("'l'" if type(tree) is list else "'u'") + ",(" + "".join(parts) + "))"
    return None


def rebuild(layout: str, tensors: list) -> Any:
    """The tree that :func:`describe` gave ``layout`` for, with ``tensors`` in its tensors' places.

    Example:
      >>> import torch
      >>> rebuild("('d',(('x',('t',0)),('n',('c',3)),))", [torch.ones(2)])
      {'x': tensor([1., 1.]), 'n': 3}
    """
    def build(node: tuple) -> Any:
        kind, value = node
        if kind == "t":
            return tensors[value]
        if kind == "c":
            return value
        if kind == "d":
            return {name: build(inner) for name, inner in value}
        items = [build(inner) for inner in value]
        return items if kind == "l" else tuple(items)

    return build(_parsed(layout))


@functools.lru_cache(maxsize=64)
def _parsed(layout: str) -> Any:
    return ast.literal_eval(layout)


def _top_level_excluded() -> Any:
    """The dispatch keys excluded at top level (autocast keys included: whether each is excluded
    follows the caller's autocast state, which the verification keeps)."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autocast"):
            excluded = excluded | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, name))
    return excluded


_TOP_LEVEL_EXCLUDED = _top_level_excluded()


@torch.library.custom_op("fundp::ghost_verify", mutates_args=())
def _ghost_verify(verifier: int, layout: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    check = _VERIFIERS.get(verifier)
    if check is None:
        raise RuntimeError("the ghost engine of this compiled step no longer exists: build the step again")
    # The verification runs loss_fn eagerly, with autograd and vmap: a custom op's kernel runs below
    # autograd, and a compiled graph with every key above the backend excluded, so the keys
    # excluded are reset to top level (the caller's autocast state kept).
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude & _TOP_LEVEL_EXCLUDED):
        check(layout, list(inputs), list(outputs))
    return [t.clone() for t in outputs]


@_ghost_verify.register_fake
def _(verifier: int, layout: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in outputs]


def verify_in_graph(verifier: InGraphVerifier, tree: Any, outputs: list) -> list | None:
    """``outputs`` (tensors) passed through ``fundp::ghost_verify``, which runs
    ``verifier(tree, outputs)`` on the real tensors each time the graph runs; ``None`` (nothing
    done) when ``tree`` is not made of dicts, lists and tuples (:func:`describe`)."""
    inputs: list = []
    layout = describe(tree, inputs)
    if layout is None:
        return None
    return _ghost_verify(verifier.number, layout, inputs, [t.detach() for t in outputs])


def check_same_outputs(losses: torch.Tensor, sq_norms: list, compiled_losses: torch.Tensor, compiled_sq_norms: list,
                       names: list, tol: float) -> None:
    """The compiled engine's losses and per-leaf squared norms (``[B]`` each, plain or
    ``ScaledSqNorm``; ``None`` for a leaf without) must equal the verified eager engine's, on every
    row: ``|sqrt(s'_il) - sqrt(s_il)| <= tol * sqrt(sum_l s_il)``; a row whose squared norm is not
    finite must be so in both."""
    total = sum((_plain(sq) for sq in sq_norms if sq is not None), torch.zeros_like(losses, dtype=torch.float64))
    scale = total.sqrt().nan_to_num(0.0, 0.0, 0.0) + 1e-150
    _check_same_losses(losses, compiled_losses, tol)
    for name, sq, compiled in zip(names, sq_norms, compiled_sq_norms):
        if sq is None or compiled is None:
            continue
        expected, got = _plain(sq).sqrt(), _plain(compiled).sqrt()
        finite = torch.isfinite(expected)
        bad = (finite != torch.isfinite(got)) | (finite & ((got - expected).abs() > tol * scale))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise GhostVerificationError(
                f"under torch.compile the ghost engine's per-example norm of {name} for example {row} is "
                f"{float(got[row]):.6g}, but the verified eager engine gives {float(expected[row]):.6g} "
                f"(tolerance {tol:g} of the example's norm {float(scale[row]):.6g}). Use grad_method='vmap', "
                "or report the model.")
