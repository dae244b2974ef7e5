"""The ghost engine: trace, one backward to the probes, exact per-parameter norms, book-keeping sums."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import optree
import torch

from fundp import random as fundp_random
from fundp._validate import check_batch, check_params
from fundp.engines.base import EngineOutput
from fundp.engines.ghost import attention, broadcast, conv, embedding, linear, norms  # noqa: F401  (register rules)
from fundp.engines.ghost._index import is_compiling
from fundp.engines.ghost._norms import LeafGrads, RowsLeaf, leaf_sq_norms
from fundp.engines.ghost._registry import RULES
from fundp.engines.ghost._tracer import Tracer, Untrusted, transform_grads
from fundp.engines.ghost._uses import Rows, materialise, transpose_form
from fundp.engines.ghost._mixed import vmap_rows
from fundp.engines.ghost._verify import (InGraphVerifier, check_same_outputs, describe, tolerance, verify_engine,
                                         verify_in_graph)
from fundp.engines.ghost._consistency import check_batch_consistency as _check_consistency
from fundp.engines.ghost._errors import GhostUnsupportedError
from fundp.engines.ghost._keyed_dropout import keyed_randomness

__all__ = ["GhostUnsupportedError", "make_ghost_engine", "ghost_plan", "VERIFY_MODES"]

VERIFY_MODES = (False, "first", "always")


def _proxy(leaf: Any) -> Any:
    # A fresh leaf that requires grad: every autograd edge that reaches it is a use the rules did not
    # attribute (the rules compute from detached parameters), which the graph walk finds.
    return leaf.detach().requires_grad_() if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else leaf


def trace(loss_fn: Callable, params: Any, batch: Any, has_aux: bool, randomness: str, key, *, proxy: bool = True,
          probe_grad: bool | str = True):
    """Runs ``loss_fn`` under the tracer; returns ``(tracer, proxies, losses, aux)``.

    ``proxy=False``: ``params`` are used as they are (the primals of a ``torch.func`` transform);
    ``probe_grad``: see :class:`~fundp.engines.ghost._tracer.Tracer`.
    """
    size = check_batch(batch)
    if proxy:
        with torch.enable_grad():
            proxy_params = optree.tree_map(_proxy, params)
    else:
        proxy_params = params
    proxies = optree.tree_leaves(proxy_params)
    tracer = Tracer(proxies, optree.tree_leaves(batch), size, random_ok=randomness != "error", rules=RULES,
                    probe_grad=probe_grad)
    # enable_grad: the probes' gradients are needed even when the caller is under torch.no_grad().
    # The keyed dropout (rows = the whole batch) sits below the tracer: the tracer sees each dropout
    # call as one op, and the mode computes its mask outside the tracer's sight.
    with keyed_randomness(key, batch, randomness) as keyed, torch.enable_grad(), tracer:
        out = loss_fn(proxy_params, batch)
    if tracer.unkeyed is None and keyed is not None:
        tracer.unkeyed = keyed.unkeyed
    losses, aux = out if has_aux else (out, None)
    if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-example losses of shape [B] = [{size}] (reduction='none'), got {shape}")
    return tracer, proxies, losses, aux


UNSEEN = ("used by code the tracer cannot see (torch.jit, a custom autograd.Function, torch.ops, an extension, "
          "or under torch.compile an op dynamo does not show it, such as the Tensor property .T), or by an op it "
          "does not handle")


def _unseen_consumers(losses: torch.Tensor, proxies: list) -> set:
    """Indices of parameters that the loss still reaches through autograd: uses the rules did not take."""
    targets = {id(p): i for i, p in enumerate(proxies) if isinstance(p, torch.Tensor) and p.requires_grad}
    found: set = set()
    stack = [losses.grad_fn]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets and proxies[targets[id(variable)]] is variable:
            found.add(targets[id(variable)])
        stack.extend(child for child, _ in node.next_functions)
    return found


def fallback_reasons(tracer: Tracer, proxies: list, losses: torch.Tensor | None) -> dict:
    """``{leaf index: reason}`` for every leaf the ghost path cannot handle."""
    reasons: dict = {}
    rows = tracer.layout(losses) if losses is not None else None
    if tracer.unkeyed is not None and is_compiling():
        # Under torch.compile a draw not keyed per example would be seeded by a host read of the key
        # inside the traced transform: the step leaves the ghost path ("auto": vmap) instead.
        why = (f"under torch.compile the ghost path keys only dropout masks per example, and loss_fn draws "
               f"otherwise ({tracer.unkeyed}): run the step eagerly or use grad_method='vmap'")
        return {i: why for i, p in enumerate(proxies) if isinstance(p, torch.Tensor) and p.is_floating_point()}
    if isinstance(rows, Untrusted) and rows.mixes:
        # The losses were computed from values moved across the batch (a slice or gather of it, a
        # view made out of the tracer's sight): nothing proves that examples do not interact.
        why = f"the per-example losses come from rows the tracer could not follow ({rows.reason})"
        return {i: why for i, p in enumerate(proxies) if isinstance(p, torch.Tensor) and p.is_floating_point()}
    for index in range(len(proxies)):
        if index in tracer.unsupported:
            reasons[index] = tracer.unsupported[index]
    for use in tracer.uses:
        layout = tracer.layout(use.target)
        origin = tracer.origin(use.target)
        if isinstance(layout, Untrusted) and origin is not None:
            for index in origin.leaves:
                reasons.setdefault(index, f"used by {use.op} on rows that are not the examples in order ({layout.reason})")
    if losses is not None and losses.requires_grad and not is_compiling():
        for index in _unseen_consumers(losses, proxies):
            reasons.setdefault(index, UNSEEN)
    for index in range(len(proxies)):
        if index not in reasons and index not in tracer.seen and isinstance(proxies[index], torch.Tensor) \
                and proxies[index].is_floating_point():
            reasons[index] = "not used by any torch op the engine can see"
    leaves = proxies
    for index, leaf in enumerate(leaves):
        if sum(other is leaf for other in leaves) > 1:
            reasons[index] = "the same tensor appears twice in params"
    return reasons


def _path_names(params: Any) -> list:
    paths = optree.tree_paths(params)
    return ["params" + "".join(f"[{p!r}]" for p in path) for path in paths]


def _pulled(tracer: Tracer, use: Any) -> bool:
    """Whether a use's target is computed from parameters (a slice, an expand, a table lookup, several
    leaves): its per-example gradients are then pulled back to the leaves by a vector-Jacobian product."""
    origin = tracer.origin(use.target)
    return origin is not None and not (origin.form in ("same", "T") and len(origin.leaves) == 1)


def _leaf_forms(tracer: Tracer, proxies: list, grads: list, skip: set, pull: Callable | None = None) -> dict:
    """``{leaf index: [Factor | Ids | Rows in the leaf's own shape]}`` from every recorded use.

    ``pull``: ``pull([(k, rows)]) -> {leaf index: [B, *leaf.shape]}``, the per-example gradients that
    the rows ``rows [B, *target.shape]`` of the ``k``-th pulled use's target give the leaves (the
    compiled path); by default a batched ``torch.autograd.grad`` through the proxies.
    """
    forms: dict = {}
    pending: list = []
    wanted: set = set()
    position = -1
    for use in tracer.uses:
        origin = tracer.origin(use.target)
        if origin is None:
            continue
        pulled = _pulled(tracer, use)
        position += pulled
        if not origin.leaves - skip:
            continue
        form = use.resolve(grads)
        if not pulled:
            (index,) = origin.leaves
            leaf = proxies[index]
            if origin.form == "T":
                form = transpose_form(form, tuple(leaf.shape))
            elif isinstance(form, Rows):
                form = Rows(form.rows.reshape((form.rows.shape[0],) + tuple(leaf.shape)))
            forms.setdefault(index, []).append(form)
            continue
        # A tensor computed from parameters (a slice, an expand, a table lookup): its per-example
        # gradients are pulled back to the parameters by a batched vector-Jacobian product.
        rows = materialise(form, tuple(use.target.shape)).to(use.target.dtype)
        if pull is not None:
            pending.append((position, rows))
            wanted |= origin.leaves - skip
            continue
        # Leaves on vmap get their whole gradient there; the others still need this use's share.
        indices = sorted(origin.leaves - skip)
        pulled_grads = torch.autograd.grad([use.target], [proxies[i] for i in indices], grad_outputs=[rows],
                                           retain_graph=True, allow_unused=True, is_grads_batched=True)
        for index, grad in zip(indices, pulled_grads):
            if grad is not None:
                forms.setdefault(index, []).append(Rows(grad))
    if pending and pull is not None:
        for index, grad in pull(pending).items():
            if index in wanted:
                forms.setdefault(index, []).append(Rows(grad))
    return forms


def _plain(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, torch.Tensor) else leaf


def _with_leaves(params: Any, make: Callable) -> Any:
    """``params`` with leaf ``i`` replaced by ``make(i, leaf)``.  (The tree spec lives only here: under
    torch.compile one must not live across a graph break in ``loss_fn``.)"""
    leaves, spec = optree.tree_flatten(params)
    return optree.tree_unflatten(spec, [make(i, leaf) for i, leaf in enumerate(leaves)])


def _outside_level(forms: dict) -> dict:
    """The forms with every tensor passed through a view: tensors the compiled path's rules kept
    inside ``torch.func.vjp`` are wrappers of a finished transform, which ops unwrap (dynamo cannot
    hand such a wrapper to a graph after a break).  One tensor stays one tensor (shared activations)."""
    done: list = []  # (tensor, its view), looked up with `is` (no id(): dynamo would guard on it)

    def plain(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        for known, view in done:
            if known is value:
                return view
        done.append((value, value.view(value.shape)))
        return done[-1][1]

    return {index: [type(form)(*(plain(part) for part in form)) for form in leaf_forms]
            for index, leaf_forms in forms.items()}


def _reaches(loss_fn: Callable, params: Any, batch: Any, has_aux: bool, randomness: str, key: Any,
             watched: list) -> bool:
    """Whether the losses depend (through autograd, structurally) on a leaf at ``watched`` once the
    rules have taken their uses: a use no rule recorded.  (A run whose values the compiler drops.)"""
    with torch.enable_grad():
        merged = _with_leaves(params, lambda i, leaf: leaf.detach().requires_grad_() if i in watched else _plain(leaf))
    _, _, losses, _ = trace(loss_fn, merged, batch, has_aux, randomness, key, proxy=False, probe_grad=False)
    return bool(losses.requires_grad)


def _puller(loss_fn: Callable, params: Any, batch: Any, has_aux: bool, randomness: str, key: Any, count: int) -> Callable:
    """The ``pull`` of :func:`_leaf_forms` under ``torch.compile``: ``vmap`` of the vector-Jacobian
    product of a run of ``loss_fn`` differentiable in the floating leaves, whose outputs are the
    ``count`` pulled uses' targets (the compiler keeps only what computes those)."""
    leaves = optree.tree_leaves(params)
    floating = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]

    def targets(*primals: torch.Tensor) -> tuple:
        given = dict(zip(floating, primals))
        merged = _with_leaves(params, lambda i, leaf: given.get(i, _plain(leaf)))
        tracer, _, _, _ = trace(loss_fn, merged, batch, has_aux, randomness, key, proxy=False, probe_grad=False)
        found = tuple(use.target for use in tracer.uses if _pulled(tracer, use))
        if len(found) != count:
            raise GhostUnsupportedError(f"a second run of loss_fn used {len(found)} tensors computed from parameters, "
                                        f"the first {count}: run the step eagerly or with grad_method='vmap'")
        return found

    outputs, vjp_fn = torch.func.vjp(targets, *[leaves[i].detach() for i in floating])[:2]

    def pull(pending: list) -> dict:
        size = pending[0][1].shape[0]
        rows = [torch.zeros((size,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in outputs]
        for position, value in pending:
            rows[position] = value
        pulled = torch.func.vmap(vjp_fn)(tuple(rows))
        return dict(zip(floating, pulled))

    return pull


def ghost_plan(loss_fn: Callable, params: Any, batch: Any, *, has_aux: bool = False) -> dict:
    """Returns ``{parameter path: "ghost" | "vmap: <reason>"}``: how ``grad_method="auto"`` handles each leaf.

    Runs one forward of ``loss_fn`` (no backward).  Examples that interact raise
    :class:`~fundp.engines.ghost.ExamplesInteractError`.

    Example:
      >>> import torch, fundp
      >>> from fundp.engines.ghost import ghost_plan
      >>> model = torch.nn.Linear(3, 2)
      >>> params = dict(model.named_parameters())
      >>> loss_fn = lambda p, b: fundp.functional_call(model, p, (b,)).sum(dim=1)
      >>> ghost_plan(loss_fn, params, torch.ones(4, 3))
      {"params['bias']": 'ghost', "params['weight']": 'ghost'}
    """
    tracer, proxies, losses, _ = trace(loss_fn, params, batch, has_aux, "different", fundp_random.key(0))
    reasons = fallback_reasons(tracer, proxies, losses)
    return {name: ("vmap: " + reasons[i] if i in reasons else "ghost") for i, name in enumerate(_path_names(params))}


def _signature(leaves: list, batch: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in optree.tree_leaves(batch)) + tuple(
        (tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))


def make_ghost_engine(
    loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error", fallback: bool = False,
    verify: bool | str = "first", check_batch_consistency: bool = True,
) -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` (see :mod:`fundp.engines.base`).

    ``fallback=False`` (``grad_method="ghost"``): a parameter the ghost path cannot handle raises
    :class:`GhostUnsupportedError`.  ``fallback=True`` (``"auto"``): such parameters get their
    per-example gradients from ``vmap(grad)`` (with ``randomness != "error"`` the whole step falls
    back to ``vmap``, so that every part of an example's gradient sees the same dropout mask).
    ``verify``: see :mod:`fundp.engines.ghost._verify`.  ``check_batch_consistency``: on every call
    of the ghost path, the losses of a random quarter of the batch must equal the batch's
    (:mod:`fundp.engines.ghost._consistency`).  With ``randomness="different"`` every run of
    ``loss_fn`` draws each example's dropout masks keyed by its row in the step's batch
    (:mod:`fundp.engines.ghost._keyed_dropout`), so the check and the verification's single
    examples see the batch's masks; a run with a random op not keyed per example skips the check
    and the single-example check.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import make_ghost_engine
      >>> params = {"w": torch.tensor([[1.0, 2.0]])}
      >>> loss_fn = lambda p, b: torch.nn.functional.linear(b, p["w"]).sum(dim=1)
      >>> out = make_ghost_engine(loss_fn)(params, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), None)
      >>> s = out.sq_norms["w"]
      >>> s.scale * s.scaled.sqrt(), out.losses  # ||grad_i|| = ||x_i||
      (tensor([5., 1.]), tensor([11.,  2.]))
      >>> out.weighted_sum({"w": torch.tensor([1.0, 0.5])})  # 1.0 * x_0 + 0.5 * x_1
      {'w': tensor([[3.0000, 4.5000]])}
    """
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
    if verify not in VERIFY_MODES or isinstance(verify, bool) and verify:
        raise ValueError(f"verify must be False, 'first' or 'always', got {verify!r}")
    if not isinstance(check_batch_consistency, bool):
        raise TypeError(f"check_batch_consistency must be a bool, got {check_batch_consistency!r}")
    if randomness == "same":
        if not fallback:
            raise ValueError("grad_method='ghost' runs the batch in one forward and cannot share one random draw "
                             "across examples (randomness='same'): use grad_method='vmap'")
        from fundp.engines.vmap import make_vmap_engine

        return make_vmap_engine(loss_fn, has_aux=has_aux, randomness=randomness)
    verified: dict = {}
    calls = [0]
    eager_only = [False]  # a traced call saw a checkpointed block: later compiled calls run eagerly
    # signature -> whether an eager run drew nothing but dropout masks keyed per example (see dispatch)
    keyed_runs: dict = {}

    @torch.compiler.disable
    def run_verification(params, batch, key, sq_norm_leaves, losses, weighted_sum_leaves, data_dependent, keyed):
        leaves, treespec = optree.tree_flatten(params)
        calls[0] += 1
        checked = verify_engine(loss_fn, leaves, treespec, batch, key, sq_norm_leaves, losses, weighted_sum_leaves,
                                _path_names(params), has_aux, randomness, keyed_randomness,
                                thorough=data_dependent, seed=calls[0], keyed=keyed)
        # Never recorded when nothing was checked, nor when the computation depends on the data.
        if checked and not data_dependent:
            verified[_signature(leaves, batch)] = True

    def refuse_or_vmap(params: Any, batch: Any, key: Any, reasons: dict, tracer: Any = None) -> EngineOutput | None:
        if not fallback:
            names = _path_names(params)
            details = "; ".join(f"{names[i]}: {why}" for i, why in sorted(reasons.items()))
            raise GhostUnsupportedError(f"grad_method='ghost' cannot handle {details}. Use grad_method='auto' "
                                        "(vmap for these parameters) or grad_method='vmap'")
        floating = sum(isinstance(p, torch.Tensor) and p.is_floating_point() for p in optree.tree_leaves(params))
        if randomness != "error" or len(reasons) >= floating:  # nothing left for the ghost path
            from fundp.engines.vmap import make_vmap_engine

            whole = make_vmap_engine(loss_fn, has_aux=has_aux, randomness=randomness)
            out = _vmap_or_refuse(tracer, reasons, params, whole, params, batch, key)
            if not is_compiling() and tracer is not None and tracer.data_dependent is None:
                # Every leaf on vmap (exact by construction): nothing of the ghost path to verify, so
                # later compiled calls of this signature need not leave the graph to verify.
                verified[_signature(optree.tree_leaves(params), batch)] = "vmap"
            return out
        return None

    def autograd_front(params: Any, batch: Any, key: Any) -> Any:
        """Eagerly: one ``torch.autograd.grad`` to the probes (and the parameters' proxies)."""
        tracer, proxies, losses, aux = trace(loss_fn, params, batch, has_aux, randomness, key)
        eager_only[0] = eager_only[0] or tracer.eager_only
        reasons = fallback_reasons(tracer, proxies, losses)
        if reasons:
            whole = refuse_or_vmap(params, batch, key, reasons, tracer)
            if whole is not None:
                return whole
        # The parameters' proxies join the backward: one still reached by the loss has a use no rule
        # recorded (the graph walk has found those already eagerly; this is free when nothing is
        # reached: autograd returns None).
        watched = [i for i, p in enumerate(proxies) if i not in reasons and isinstance(p, torch.Tensor) and p.requires_grad]
        grads: list = []
        if tracer.probes or watched:
            raw = torch.autograd.grad(losses, tracer.probes + [proxies[i] for i in watched],
                                      grad_outputs=torch.ones_like(losses), allow_unused=True, retain_graph=False)
            grads = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g
                     for p, g in zip(tracer.probes, raw)]
            unseen = {i: UNSEEN for i, g in zip(watched, raw[len(tracer.probes):]) if g is not None}
            if unseen:
                reasons.update(unseen)
                whole = refuse_or_vmap(params, batch, key, reasons, tracer)
                if whole is not None:
                    return whole
        return tracer, proxies, losses, aux, grads, reasons, None

    def functional_front(params: Any, batch: Any, key: Any) -> Any:
        """Under ``torch.compile``: the same in one run of ``loss_fn`` inside ``torch.func.vjp`` (which
        dynamo traces with no option).

        The rules make the probes inside the forward, differentiable at the transform's level, and
        the run takes their gradients there (:func:`~fundp.engines.ghost._tracer.transform_grads`);
        ``vjp``'s own pullback is never called (the compiler drops it).  The parameters enter as
        proxies requiring grad (plain autograd, below the transform): the rules compute from
        detached parameters, so losses that still require grad depend on a parameter through an op
        no rule took -- structurally, whatever the values.
        """
        with torch.enable_grad():
            proxied = optree.tree_map(_proxy, params)
        # The parameters and the batch's floating tensors are the primals: inside the transform,
        # views made out of the tracer's sight (dynamo does not show `w.T`) then have as their base
        # the very tensors the tracer follows.
        inputs: list = optree.tree_leaves((proxied, batch))  # type: ignore[arg-type]
        joined = [i for i, leaf in enumerate(inputs) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        kept: dict = {}

        def probed(*primals: torch.Tensor) -> tuple:
            given = dict(zip(joined, primals))
            tree = _with_leaves((proxied, batch), lambda i, leaf: given.get(i, inputs[i]))
            tracer, found, out, aux = trace(loss_fn, tree[0], tree[1], has_aux, randomness, key, proxy=False,
                                            probe_grad="transform")
            kept.update(tracer=tracer, proxies=found, aux=aux, out=out)
            # (detached: no autograd history below the transform rides along with the gradients)
            return out, tuple(grad.detach() for grad in transform_grads(out, tracer.probes))

        with contextlib.nullcontext() if torch.compiler.is_compiling() else torch.jit.optimized_execution(False):
            # (Run eagerly, TorchScript's warm profiling executor runs a differentiable graph that
            # records no autograd below a torch.func transform, hiding a use from the check below.)
            losses, _, probe_grads = torch.func.vjp(probed, *[inputs[i] for i in joined], has_aux=True)  # type: ignore[misc]
        tracer, proxies = kept["tracer"], kept["proxies"]
        if tracer.eager_only:  # a checkpointed block (a parameter used with grad off): run eagerly, now and later
            eager_only[0] = True
            return outside_graph(params, batch, key)
        # (the losses the tracer saw, inside the transform: its row layouts are keyed by that tensor)
        reasons = fallback_reasons(tracer, proxies, kept["out"])
        watched = [i for i, p in enumerate(proxies) if i not in reasons and isinstance(p, torch.Tensor)
                   and p.is_floating_point()]
        if losses.requires_grad and watched and (not reasons or _reaches(
                loss_fn, params, batch, has_aux, randomness, key, watched)):
            # The losses still depend on a parameter through an op no rule took (one the tracer did
            # not see): structurally, whatever the values.  Which leaf is not known: none is trusted.
            reasons.update({i: UNSEEN for i in watched})
        if reasons:
            whole = refuse_or_vmap(params, batch, key, reasons, tracer)
            if whole is not None:
                return whole
        pulled = [use for use in tracer.uses if _pulled(tracer, use)]
        pull = None
        if any(tracer.origin(use.target).leaves - set(reasons) for use in pulled):
            pull = _puller(loss_fn, params, batch, has_aux, randomness, key, len(pulled))
        return tracer, proxies, losses.detach(), kept["aux"], list(probe_grads), reasons, pull

    def engine(params: Any, batch: Any, key: torch.Tensor | None = None, consistency: bool = True) -> EngineOutput:
        front = (functional_front if is_compiling() else autograd_front)(params, batch, key)
        if isinstance(front, EngineOutput):
            return front
        tracer, proxies, losses, aux, grads, reasons, pull = front
        # (flattened after the forward: a tree spec must not live across a graph break in loss_fn)
        leaves, treespec = optree.tree_flatten(params)
        if randomness != "error" and not is_compiling():
            keyed_runs[_signature(leaves, batch)] = tracer.unkeyed is None
        forms = _leaf_forms(tracer, proxies, grads, set(reasons), pull)
        if pull is not None or is_compiling():
            forms = _outside_level(forms)
        grads = []  # output gradients that no form holds (norm layers, biases: rows) are freed now
        handlers: list[Any] = [None] * len(leaves)
        size = losses.shape[0]
        for index, leaf in enumerate(leaves):
            if index in reasons:
                continue
            if index in forms:
                handlers[index] = LeafGrads(leaf, forms[index])
            else:  # never reached by the loss: zero gradient
                zeros = torch.zeros((size,) + tuple(leaf.shape), dtype=leaf.dtype, device=leaf.device)
                handlers[index] = RowsLeaf(zeros)
        if reasons:
            rows = _vmap_or_refuse(tracer, reasons, params, vmap_rows, loss_fn, leaves, treespec, sorted(reasons), batch,
                                   has_aux)
            for index, leaf_rows in rows.items():
                handlers[index] = RowsLeaf(leaf_rows)
        sq_norm_leaves = leaf_sq_norms(handlers)

        def weighted_sum_leaves(factor_leaves: list) -> list:
            return [handler.weighted_sum(c) for handler, c in zip(handlers, factor_leaves)]

        losses = losses.detach()
        # A Python value read from the batch steers the computation: every call is verified.
        data_dependent = tracer.data_dependent is not None
        checked = None
        if verify and is_compiling() and not data_dependent:
            # In the graph, as one opaque op that verifies at run time (see verify_in_graph).
            checked = _verified_in_graph(params, batch, key, losses, sq_norm_leaves)
            if checked is not None:
                losses, sq_norm_leaves = checked
        sq_norms = optree.tree_unflatten(treespec, sq_norm_leaves)
        del treespec  # a tree spec must not live across the verification's graph break under torch.compile

        def weighted_sum(factors: Any) -> Any:
            structure = optree.tree_structure(params)
            return optree.tree_unflatten(structure, weighted_sum_leaves(structure.flatten_up_to(factors)))

        if checked is None and (verify == "always" or (
                verify == "first" and (data_dependent or _signature(leaves, batch) not in verified))):
            run_verification(params, batch, key, sq_norm_leaves, losses, weighted_sum_leaves, data_dependent,
                             tracer.unkeyed is None)
        if consistency and check_batch_consistency and tracer.unkeyed is None:  # (else a subset would draw other masks)
            _check_consistency(loss_fn, params, batch, key, losses, has_aux, tolerance(leaves), randomness,
                               keyed_randomness)
        aux = optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return EngineOutput(sq_norms, losses, aux, weighted_sum)

    def check_compiled(tree: Any, outputs: list) -> bool:
        """At run time, inside the compiled graph (``fundp::ghost_verify``): an unverified signature
        (or every call with ``verify="always"``) runs the engine eagerly, verified, and the compiled
        losses and norms must equal its own.  Returns whether the signature is verified for good."""
        params, batch, key = tree
        leaves = optree.tree_leaves(params)
        signature = _signature(leaves, batch)
        if verify == "first" and signature in verified:
            return True
        eager = engine(params, batch, key, consistency=False)  # records the signature once verified
        structure = optree.tree_structure(params)
        flat = structure.flatten_up_to(eager.sq_norms)
        try:
            check_same_outputs(eager.losses, flat, outputs[0], _unpack_norms(outputs[1:], flat), _path_names(params),
                               tolerance(leaves))
        except Exception:
            verified.pop(signature, None)  # the compiled graph is not verified: check again next call
            raise
        return verify == "first" and signature in verified

    in_graph = InGraphVerifier(torch.compiler.disable(check_compiled))

    def _verified_in_graph(params: Any, batch: Any, key: Any, losses: torch.Tensor, sq_norm_leaves: list) -> Any:
        """``(losses, sq_norm_leaves)`` passed through the in-graph verification; ``None`` when the
        inputs' containers cannot be described to it (:func:`~._verify.describe`)."""
        passed = verify_in_graph(in_graph, (params, batch, key), [losses] + _pack_norms(sq_norm_leaves))
        if passed is None:
            return None
        return passed[0], _unpack_norms(passed[1:], sq_norm_leaves)

    # Under torch.compile the engine differentiates by torch.func.vjp (functional_front), which
    # dynamo traces into the step's graph with no option set; its verification is one op of that
    # graph (verify_in_graph), so every call, the first included, runs one graph.
    outside_graph = torch.compiler.disable(engine)

    def dispatch(params: Any, batch: Any, key: torch.Tensor | None = None) -> EngineOutput:
        if not is_compiling():
            check_params(params)
            return engine(params, batch, key)
        if eager_only[0]:  # a traced call saw a checkpointed block (a parameter used with grad off)
            return outside_graph(params, batch, key)
        if randomness != "error" and not keyed_runs.get(_signature(optree.tree_leaves(params), batch), False):
            # Dynamo never shows torch.rand & co. to a TorchFunctionMode, so a traced run cannot tell
            # keyed dropout from random ops it must seed from the key (and such an op traced inside
            # the engine's torch.func.vjp fails to compile).  So a signature's first compiled call runs
            # the engine eagerly, outside the graph, where every random op is seen; only once that
            # run drew nothing but dropout masks keyed per example do later calls recompile with the
            # engine in the graph (one recompilation, the guard on this dict).
            return outside_graph(params, batch, key)
        if verify and describe((params, batch, key), []) is None and (
                verify == "always" or _signature(optree.tree_leaves(params), batch) not in verified):
            # Inputs in containers the in-graph verification cannot rebuild (a namedtuple): the
            # signature's first call runs outside the graph, eagerly, where it is verified.
            return outside_graph(params, batch, key)
        return engine(params, batch, key)

    return dispatch


def _pack_norms(sq_norm_leaves: Any) -> list:
    """The tensors of per-leaf squared norms (plain ``[B]`` or ``ScaledSqNorm``; ``None`` has none)."""
    return optree.tree_leaves(sq_norm_leaves)


def _unpack_norms(tensors: list, like: Any) -> Any:
    """The inverse of :func:`_pack_norms`, shaped like the leaves ``like``."""
    return optree.tree_unflatten(optree.tree_structure(like), tensors)


def _vmap_or_refuse(tracer: Any, reasons: dict, params: Any, run: Callable, *args: Any) -> Any:
    """``run(*args)`` (the vmap fallback); a model that reads Python values from the batch, which vmap
    cannot run, gets an error in the user's terms instead of vmap's."""
    try:
        return run(*args)
    except RuntimeError as error:
        if tracer is None or tracer.data_dependent is None or "vmap" not in str(error):
            raise
        names = _path_names(params)
        details = "; ".join(f"{names[i]}: {why}" for i, why in sorted(reasons.items()))
        raise GhostUnsupportedError(
            f"{tracer.data_dependent}, and the ghost path cannot handle {details}; grad_method='vmap' cannot read "
            "Python values from the batch either. Compute that value with tensor ops (e.g. a mask instead of "
            "int(lengths.max())), or outside loss_fn") from error
