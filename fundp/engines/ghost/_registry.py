"""The rule registry: which torch function is handled by which rule, and how to add one.

A rule is ``rule(tracer, func, args, kwargs) -> output | None``.  It is called for a torch call
that reads a parameter-derived tensor.  Returning ``None`` means "not a case I handle": the call
then runs as usual and the parameters it reads go to the ``vmap`` path (``"auto"``) or raise
(``"ghost"``).  A rule that handles the call

1. computes the output from *detached* parameters (so no autograd edge reaches them),
2. adds zero probes with ``tracer.probe(tensor)`` wherever it needs a per-row output gradient,
3. records each parameter-derived operand with ``tracer.record(target, resolve, op)``, where
   ``resolve(probe_grads)`` returns the exact per-example gradient of ``target`` as a
   :class:`~fundp.engines.ghost.Factor`, :class:`~fundp.engines.ghost.Ids` or
   :class:`~fundp.engines.ghost.Rows`,
4. sets the output's batch layout (``tracer.set_layout``; ``tracer.probe`` copies it).

Every rule is checked by the engine's verification pass against single-example gradients; a
registered rule must still come with a test against micro-batching (see the README recipe).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["RULES", "register_rule"]

RULES: dict[Any, Callable] = {}


def register_rule(*funcs: Any) -> Callable:
    """Decorator: ``@register_rule(torch.nn.functional.my_op)`` makes ``rule`` handle those functions.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import register_rule, RULES
      >>> def my_op(x, w):  # a custom op: x * w with w broadcast over the batch
      ...     return x * w
      >>> @register_rule(my_op)
      ... def my_rule(tracer, func, args, kwargs):
      ...     return None  # decline: the parameters go to the vmap path
      >>> RULES[my_op] is my_rule
      True
      >>> del RULES[my_op]
    """

    def decorate(rule: Callable) -> Callable:
        for func in funcs:
            RULES[func] = rule
        return rule

    return decorate
