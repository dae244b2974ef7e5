"""Argument checks for the accounting functions, spelled with :mod:`fundp._validate`'s vocabulary.

Thin wrappers: every check is one of ``fundp._validate``'s (``check_positive``, ``check_int``,
``check_sample_rate``, ``check_delta``, ...), so an accounting error reads like any other fundp
error (``"noise_multiplier must be > 0, got -1.0"``).  Values come back as plain Python numbers,
so a 0-d tensor or a NumPy scalar works, and nothing the ledger stores drags a tensor (or a traced
value) along.  What is specific to accounting lives here: the accountant names, which of them are
upper bounds, and the error for an unreachable calibration target.
"""

from __future__ import annotations

from typing import Any

from fundp._validate import check_delta, check_int, check_positive, check_sample_rate

__all__ = ["ACCOUNTANTS", "BOUND_ACCOUNTANTS", "UnreachableTargetError"]

#: The accountants that :func:`fundp.accounting.epsilon` and friends accept.
ACCOUNTANTS = ("prv", "rdp", "gdp_approx")
#: The accountants whose epsilon is a rigorous upper bound (``"gdp_approx"`` is an estimate).
BOUND_ACCOUNTANTS = ("prv", "rdp")


class UnreachableTargetError(ValueError):
    """A calibration target cannot be met: e.g. no noise multiplier up to the bound reaches the
    target epsilon, or even one step spends more than it.

    Example:
      >>> import fundp
      >>> from fundp.accounting import UnreachableTargetError
      >>> try:
      ...     fundp.max_steps(0.01, 1e-5, noise_multiplier=0.5, sample_rate=1.0)
      ... except UnreachableTargetError as error:
      ...     print("unreachable:", "target_epsilon=0.01" in str(error))
      unreachable: True
    """


def noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    return check_positive(name, value)


def sample_rate(value: Any, name: str = "sample_rate") -> float:
    return check_sample_rate(value, name)


def steps(value: Any, name: str = "steps") -> int:
    return check_int(name, value, minimum=0)


def delta(value: Any, name: str = "delta") -> float:
    return check_delta(value, name)


def epsilon(value: Any, name: str = "epsilon") -> float:
    return check_positive(name, value)


def accountant(name: Any, argument: str = "accountant") -> str:
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, ACCOUNTANTS))}, got {name!r}")
    return name
