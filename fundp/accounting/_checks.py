"""Argument checks for the accounting functions: plain Python numbers in, errors that name the argument.

Everything the accountants take is converted here with ``float()`` / ``int()``, so a 0-d tensor or
a NumPy scalar works, and nothing the accountant stores can drag a tensor (or a traced value) along.
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = ["ACCOUNTANTS", "UnreachableTargetError"]

#: The accountants that :func:`fundp.accounting.epsilon` and friends accept.
ACCOUNTANTS = ("prv", "rdp", "gdp_approx")


class UnreachableTargetError(ValueError):
    """A calibration target cannot be met: e.g. no noise multiplier up to the bound reaches the
    target epsilon, or even one step spends more than it."""


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    sigma = _as_float(name, value)
    if not sigma > 0 or math.isinf(sigma):  # `not >` also catches NaN
        raise ValueError(f"{name} must be > 0 and finite, got {sigma}")
    return sigma


def sample_rate(value: Any, name: str = "sample_rate") -> float:
    q = _as_float(name, value)
    if not 0 < q <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {q}")
    return q


def steps(value: Any, name: str = "steps") -> int:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value}")
        value = int(value)
    try:
        count = operator.index(value)
    except TypeError:
        try:  # a 0-d integer tensor or array
            count = int(value)
            if count != value:
                raise ValueError(f"{name} must be a whole number, got {value}")
        except (TypeError, ValueError) as error:
            if isinstance(error, ValueError):
                raise
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return int(count)


def delta(value: Any, name: str = "delta") -> float:
    d = _as_float(name, value)
    if not 0 < d < 1:
        raise ValueError(f"{name} must be in (0, 1), got {d}")
    return d


def epsilon(value: Any, name: str = "epsilon") -> float:
    e = _as_float(name, value)
    if not e > 0 or math.isinf(e):
        raise ValueError(f"{name} must be > 0 and finite, got {e}")
    return e


def accountant(name: Any) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}, got {name!r}")
    return name
