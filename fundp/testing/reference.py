"""An independent reference for a DP step: one ordinary backward per example, clipping by hand.

Nothing here uses ``torch.func`` or fundp's engines and clipping code: each example's gradient
comes from ``torch.autograd.grad`` on a batch of one (micro-batching), in float64 by default, and
the clip factors are computed row by row with Python floats.  :func:`assert_matches_vmap`
compares a step's ``grads`` and ``norms`` (and ``loss``, ``aux``) with it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch

import fundp
from fundp._validate import check_batch, check_mask, check_nonnegative, check_positive
from fundp.testing.trees import leaf_names

__all__ = ["ReferenceStep", "micro_batch_grads", "reference_step", "assert_matches_vmap"]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


def micro_batch_grads(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[Any, torch.Tensor, Any]:
    """Per-example gradients by a plain loop: one ``torch.autograd.grad`` per example.

    For every row ``i`` of ``batch`` the example ``batch[i:i+1]`` (a batch of one) goes through
    ``loss_fn(params, example) -> Tensor[1]`` and ordinary autograd, with ``params`` and the
    batch's floating-point leaves cast to ``dtype`` (``None`` keeps their dtypes; use it when
    ``loss_fn`` closes over tensors, e.g. frozen layers, that must match the params' dtype).

    Returns:
      ``(grads, losses, aux)``: ``grads`` a pytree like ``params`` whose leaves are
      ``[B, *param.shape]`` (zeros for a parameter the loss does not use), ``losses`` the ``[B]``
      per-example losses, ``aux`` (with ``has_aux``) the per-example auxiliary outputs
      concatenated along their leading dimension (``None`` otherwise).

    Example:
      >>> import torch
      >>> from fundp.testing import micro_batch_grads
      >>> loss_fn = lambda p, x: (x @ p["w"]) ** 2          # gradient 2 (x_i . w) x_i
      >>> grads, losses, _ = micro_batch_grads(loss_fn, {"w": torch.tensor([1.0, 1.0])}, torch.eye(2))
      >>> grads["w"]
      tensor([[2., 0.],
              [0., 2.]], dtype=torch.float64)
      >>> losses
      tensor([1., 1.], dtype=torch.float64)
    """
    size = check_batch(batch)
    leaves, spec = optree.tree_flatten(params)
    rows: list[list[torch.Tensor]] = []
    losses: list[torch.Tensor] = []
    auxes: list[Any] = []
    for i in range(size):
        example = optree.tree_map(lambda x: _cast(x[i : i + 1], dtype), batch)
        leaf_params = [_cast(leaf, dtype).requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            out = loss_fn(optree.tree_unflatten(spec, leaf_params), example)
            loss: Any = out[0] if has_aux else out
            if not isinstance(loss, torch.Tensor) or loss.shape != (1,):
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return per-example losses of shape [B]; for a batch of one it returned {got}")
            grads = torch.autograd.grad(loss.sum(), leaf_params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, leaf_params)])
        losses.append(loss.detach()[0])
        if has_aux:
            auxes.append(optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out[1]))
    stacked = [torch.stack([row[k] for row in rows]) for k in range(len(leaves))]
    aux_out = None
    if has_aux:
        aux_out = optree.tree_map(lambda *per_example: torch.cat(per_example), *auxes)
    return optree.tree_unflatten(spec, stacked), torch.stack(losses), aux_out


class ReferenceStep(NamedTuple):
    """What :func:`reference_step` returns (all in the reference dtype).

    Example:
      >>> import torch
      >>> from fundp.testing import reference_step
      >>> ref = reference_step(lambda p, x: x @ p["w"], {"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0]]),
      ...                      max_norm=1.0, expected_batch_size=1)
      >>> ref.grads["w"], ref.counted
      (tensor([0.6000, 0.8000], dtype=torch.float64), tensor([True]))
    """

    grads: Any
    """``sum_i c_i g_i / expected_batch_size`` over the counted rows, a pytree like params."""
    scale: Any
    """``sum_i |c_i g_i| / expected_batch_size`` elementwise: the size of the summed terms."""
    norms: torch.Tensor
    """``[B]`` global L2 norms ``||g_i||`` before clipping (NaN/Inf for a non-finite gradient)."""
    losses: torch.Tensor
    """``[B]`` per-example losses."""
    counted: torch.Tensor
    """``[B]`` bool: rows in the sum (unmasked and with a finite gradient)."""
    aux: Any
    """Per-example auxiliary outputs ``[B, ...]`` (``None`` without ``has_aux``)."""


def _thresholds(max_norm: Any, params: Any, clip_style: str) -> list[float]:
    num_leaves = len(optree.tree_leaves(params))
    if clip_style != "per_layer" or isinstance(max_norm, (int, float, torch.Tensor)):
        return [check_positive("max_norm", max_norm)] * num_leaves
    values, spec = optree.tree_flatten(max_norm)
    if spec != optree.tree_structure(params):
        raise ValueError(f"max_norm for per_layer clipping must match the structure of params, got {spec}")
    return [check_positive("max_norm", value) for value in values]


def reference_step(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    max_norm: Any,
    expected_batch_size: float,
    mask: torch.Tensor | None = None,
    clip_style: str = "flat",
    gamma: float = 0.01,
    has_aux: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> ReferenceStep:
    """The noiseless DP step computed the slow, obvious way (see :func:`micro_batch_grads`).

    ``g_i`` from micro-batching, then clip factors by hand from Python floats:
    ``"flat"``: ``c_i = min(1, C / ||g_i||)``; ``"automatic"``: ``c_i = C / (||g_i|| + gamma)``;
    ``"per_layer"``: each leaf ``l`` on its own, ``c_il = min(1, C_l / ||g_il||)`` (``max_norm``
    one number or a pytree like params).  Rows with ``mask`` False or a non-finite gradient are
    left out of the sum, and the sum is divided by ``expected_batch_size``.

    Example:
      >>> import torch
      >>> from fundp.testing import reference_step
      >>> loss_fn = lambda p, x: x @ p["w"]                  # gradient of example i: x_i
      >>> ref = reference_step(loss_fn, {"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0], [0.3, 0.4]]),
      ...                      max_norm=1.0, expected_batch_size=2)
      >>> ref.grads["w"], ref.norms
      (tensor([0.4500, 0.6000], dtype=torch.float64), tensor([5.0000, 0.5000], dtype=torch.float64))
    """
    if clip_style not in ("flat", "per_layer", "automatic"):
        raise ValueError(f"clip_style must be 'flat', 'per_layer' or 'automatic', got {clip_style!r}")
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    gamma = check_nonnegative("gamma", gamma)
    size = check_batch(batch)
    if mask is not None:
        check_mask(mask, size)
    thresholds = _thresholds(max_norm, params, clip_style)
    grads, losses, aux = micro_batch_grads(loss_fn, params, batch, has_aux=has_aux, dtype=dtype)
    grad_leaves, spec = optree.tree_flatten(grads)
    sums = [torch.zeros_like(leaf[0]) for leaf in grad_leaves]
    scales = [torch.zeros_like(leaf[0]) for leaf in grad_leaves]
    norms, counted = [], []
    for i in range(size):
        row = [leaf[i] for leaf in grad_leaves]
        leaf_sq = [float(r.double().square().sum()) for r in row]
        norm = math.sqrt(math.fsum(leaf_sq)) if all(math.isfinite(s) for s in leaf_sq) else math.inf
        if any(math.isnan(s) for s in leaf_sq):
            norm = math.nan
        norms.append(norm)
        use = (mask is None or bool(mask[i])) and math.isfinite(norm)
        counted.append(use)
        if not use:
            continue
        for k, r in enumerate(row):
            if clip_style == "flat":
                factor = 1.0 if norm <= thresholds[k] else thresholds[k] / norm
            elif clip_style == "automatic":
                factor = thresholds[k] / (norm + gamma)
            else:
                leaf_norm = math.sqrt(leaf_sq[k])
                factor = 1.0 if leaf_norm <= thresholds[k] else thresholds[k] / leaf_norm
            sums[k] = sums[k] + factor * r
            scales[k] = scales[k] + (factor * r).abs()
    first = grad_leaves[0] if grad_leaves else losses
    return ReferenceStep(
        grads=optree.tree_unflatten(spec, [s / expected_batch_size for s in sums]),
        scale=optree.tree_unflatten(spec, [s / expected_batch_size for s in scales]),
        norms=torch.tensor(norms, dtype=first.dtype if first.is_floating_point() else torch.float64),
        losses=losses,
        counted=torch.tensor(counted, dtype=torch.bool),
        aux=aux,
    )


def _default_rtol(params: Any) -> float:
    dtypes = {leaf.dtype for leaf in optree.tree_leaves(params) if isinstance(leaf, torch.Tensor)}
    if dtypes <= {torch.float64}:
        return 1e-9
    if dtypes <= {torch.float64, torch.float32}:
        return 1e-4
    return 5e-2


def _leaf_error(actual: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> tuple[float, float, int]:
    """``(max |actual - reference|, max scale, flat index of the worst element)``, in float64."""
    a = actual.detach().to(device="cpu", dtype=torch.float64).flatten()
    r = reference.to(dtype=torch.float64).flatten()
    if a.numel() == 0:
        return 0.0, 0.0, 0
    diff = (a - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    worst = int(torch.argmax(diff))
    return float(diff[worst]), float(scale.to(torch.float64).abs().max()), worst


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(index))


def assert_matches_vmap(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    reference_dtype: torch.dtype | None = torch.float64,
    step: Callable[..., Any] | None = None,
    transform: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    **dp_step_kwargs: Any,
) -> Any:
    """Asserts that a noiseless DP step equals single-example gradients clipped by hand.

    Builds ``fundp.dp_step(loss_fn, noise_multiplier=0, **dp_step_kwargs)`` (any ``grad_method``,
    ``clip_style``, ...; ``max_norm`` defaults to 1 and ``expected_batch_size`` to the number of
    real rows), or takes your own ``step`` with the same calling convention, optionally wrapped by
    ``transform`` (e.g. ``torch.compile``), runs it on ``(params, batch, key, mask=mask)`` and
    compares it with :func:`reference_step`: per-example gradients from one ``torch.autograd``
    backward per example (a plain loop, not ``vmap``) in ``reference_dtype``, clipped by hand,
    summed and divided by ``expected_batch_size``.  Despite the name, the reference never uses
    ``vmap``: it is what ``vmap`` (and every faster engine) must agree with.

    Checked, with ``rtol`` (default 1e-9 for float64 params, 1e-4 for float32, 5e-2 below):

    * ``grads``: same tree structure, shapes and dtypes as ``params``; for every leaf,
      ``max |step - reference| <= atol + rtol * max(sum_i |c_i g_i|) / expected_batch_size`` —
      the error relative to the size of the summed terms, so cancellation in the sum does not
      make the check flaky;
    * ``norms``: for every real row, ``|step - reference| <= atol + rtol * reference``; a row whose
      gradient is NaN/Inf must have a non-finite norm;
    * ``loss`` (when every real loss is finite): the mean over real rows, relative to the mean
      absolute loss;
    * ``aux`` (with ``has_aux=True``): per-example ``[B, ...]``, compared on the real rows.

    Returns the step's output, for further checks.

    Raises:
      AssertionError: naming the quantity (``grads['fc.weight']``, ``norms[3]``, ``loss``,
        ``aux...``), its relative error and the step's settings.
      ValueError: ``noise_multiplier`` other than 0, or ``randomness`` other than ``"error"``
        (dropout masks cannot be reproduced one example at a time).

    Example:
      >>> import torch
      >>> from fundp.testing import assert_matches_vmap
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
      >>> params = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)}
      >>> batch = {"x": torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.1, 0.0]], dtype=torch.float64),
      ...          "y": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)}
      >>> for style in ("flat", "automatic", "per_layer"):
      ...     _ = assert_matches_vmap(loss_fn, params, batch, max_norm=0.5, clip_style=style)
      >>> wrong = lambda p, b, k, mask=None: fundp.dp_step(loss_fn, max_norm=2.0, noise_multiplier=0.0,
      ...                                                    expected_batch_size=3)(p, b, k, mask=mask)
      >>> assert_matches_vmap(loss_fn, params, batch, max_norm=0.5, step=wrong)
      Traceback (most recent call last):
      ...
      AssertionError: grads['w']: relative error ... exceeds rtol=1e-09 ...
    """
    settings = dict(dp_step_kwargs)
    if "noise_multiplier" in settings:
        if check_nonnegative("noise_multiplier", settings.pop("noise_multiplier")) != 0:
            raise ValueError("assert_matches_vmap compares noiseless steps: noise_multiplier must be 0")
    if settings.get("randomness", "error") != "error":
        raise ValueError(
            "randomness must be 'error': a model's random ops (dropout) cannot be reproduced one example at a time"
        )
    size = check_batch(batch)
    if mask is not None:
        check_mask(mask, size)
    num_real = size if mask is None else int(mask.sum())
    settings.setdefault("max_norm", 1.0)
    settings.setdefault("expected_batch_size", max(1, num_real))
    rtol = _default_rtol(params) if rtol is None else check_nonnegative("rtol", rtol)
    atol = check_nonnegative("atol", atol)
    described = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()) if not callable(v))
    where = f" [{'custom step' if step is not None else 'dp_step'}({described})]"

    if step is None:
        step = fundp.dp_step(loss_fn, noise_multiplier=0.0, **settings)
    if transform is not None:
        step = transform(step)
    key = fundp.random.key(0) if key is None else key
    out = step(params, batch, key) if mask is None else step(params, batch, key, mask=mask)

    has_aux = bool(settings.get("has_aux", False))
    ref = reference_step(
        loss_fn,
        params,
        batch,
        max_norm=settings["max_norm"],
        expected_batch_size=settings["expected_batch_size"],
        mask=mask,
        clip_style=settings.get("clip_style", "flat"),
        gamma=settings.get("gamma", 0.01),
        has_aux=has_aux,
        dtype=reference_dtype,
    )
    _check_grads(out.grads, params, ref, rtol, atol, where)
    _check_norms(out.norms, ref, mask, rtol, atol, where)
    real = torch.ones(size, dtype=torch.bool) if mask is None else mask.detach().cpu()
    if hasattr(out, "loss") and num_real > 0 and bool(torch.isfinite(ref.losses[real]).all()):
        expected_loss = float(ref.losses[real].double().mean())
        loss_scale = float(ref.losses[real].double().abs().mean())
        got = float(out.loss)
        if not abs(got - expected_loss) <= atol + rtol * loss_scale:
            raise AssertionError(
                f"loss: step {got!r}, reference {expected_loss!r} (mean over the {num_real} real rows), "
                f"relative error {abs(got - expected_loss) / max(loss_scale, 1e-300):.3g} exceeds rtol={rtol:g}{where}"
            )
    if has_aux:
        _check_aux(getattr(out, "aux", None), ref.aux, real, rtol, atol, where)
    return out


def _check_grads(grads: Any, params: Any, ref: ReferenceStep, rtol: float, atol: float, where: str) -> None:
    grads_spec = optree.tree_structure(grads)
    if grads_spec != optree.tree_structure(params):
        raise AssertionError(f"grads: tree structure {grads_spec} differs from params {optree.tree_structure(params)}{where}")
    names = leaf_names(params, "grads")
    for name, got, param, expected, scale in zip(
        names, optree.tree_leaves(grads), optree.tree_leaves(params), optree.tree_leaves(ref.grads), optree.tree_leaves(ref.scale)
    ):
        if not isinstance(got, torch.Tensor) or got.shape != param.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"{name}: shape {shape}, expected the parameter's {tuple(param.shape)}{where}")
        if got.dtype != param.dtype:
            raise AssertionError(f"{name}: dtype {got.dtype}, expected the parameter's {param.dtype}{where}")
        error, size, worst = _leaf_error(got, expected, scale)
        if not error <= atol + rtol * size:
            index = _unravel(worst, got.shape)
            relative = error / size if size > 0 else math.inf
            raise AssertionError(
                f"{name}: relative error {relative:.3g} exceeds rtol={rtol:g} (max |step - reference| = {error:.3g} "
                f"at index {index}: step {got.flatten()[worst].item()!r}, reference {expected.flatten()[worst].item()!r}; "
                f"size of the clipped terms {size:.3g}){where}"
            )


def _check_norms(norms: Any, ref: ReferenceStep, mask: torch.Tensor | None, rtol: float, atol: float, where: str) -> None:
    size = ref.norms.shape[0]
    if not isinstance(norms, torch.Tensor) or norms.shape != (size,):
        shape = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
        raise AssertionError(f"norms: shape {shape}, expected [B] = [{size}]{where}")
    got = norms.detach().to(device="cpu", dtype=torch.float64)
    expected = ref.norms.to(torch.float64)
    for i in range(size):
        if mask is not None and not bool(mask[i]):
            continue
        g, e = float(got[i]), float(expected[i])
        if not math.isfinite(e):
            if math.isfinite(g):
                raise AssertionError(f"norms[{i}]: step {g!r} is finite but example {i}'s gradient is not (reference {e!r}){where}")
            continue
        if not abs(g - e) <= atol + rtol * e:
            relative = abs(g - e) / e if e > 0 else math.inf
            raise AssertionError(
                f"norms[{i}]: step {g!r}, reference {e!r}: relative error {relative:.3g} exceeds rtol={rtol:g}{where}"
            )


def _check_aux(aux: Any, expected: Any, real: torch.Tensor, rtol: float, atol: float, where: str) -> None:
    aux_spec, expected_spec = optree.tree_structure(aux), optree.tree_structure(expected)
    if aux_spec != expected_spec:
        raise AssertionError(f"aux: tree structure {aux_spec} differs from the per-example reference {expected_spec}{where}")
    for name, got, want in zip(leaf_names(expected, "aux"), optree.tree_leaves(aux), optree.tree_leaves(expected)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"{name}: shape {shape}, expected per-example {tuple(want.shape)}{where}")
        got_rows, want_rows = got.detach().cpu()[real], want[real]
        if not (want_rows.is_floating_point() or want_rows.is_complex()):
            if not torch.equal(got_rows.to(want_rows.dtype), want_rows):
                raise AssertionError(f"{name}: values differ from the per-example reference{where}")
            continue
        error, size, worst = _leaf_error(got_rows, want_rows, want_rows)
        if not error <= atol + rtol * size:
            raise AssertionError(
                f"{name}: relative error {error / max(size, 1e-300):.3g} exceeds rtol={rtol:g} "
                f"(max |step - reference| = {error:.3g}){where}"
            )
