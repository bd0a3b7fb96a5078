"""Argument validation shared by every callback: one helper per kind of argument, each stating what it accepts.

Every check raises ``ValueError`` naming the argument and what is accepted, and returns the value normalised to a
plain Python type (NumPy scalars such as ``np.int64(10)`` or ``np.float32(3.0)`` are valid numbers; ``bool`` is
never a number).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _describe_range(integer: bool, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    noun = "an integer" if integer else "a number"
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if lt is not None:
        bounds.append(f"< {lt:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    return noun + (" " + " and ".join(bounds) if bounds else "")


def check_number(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    finite: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` as an ``int`` (``integer=True``) or ``float``, if it is one within the stated bounds.

    Args:
        name: the argument's name, for the error message.
        value: what the user passed.
        gt, ge, lt, le: strict and inclusive lower and upper bounds.
        integer: require an integral number (``3.0`` is not an integer here; ``np.int64(3)`` is).
        finite: reject ``inf`` (NaN is always rejected).
        optional: accept ``None`` (returned as is).

    Raises:
        ValueError: naming ``name`` and what is accepted.
    """
    if value is None and optional:
        return None
    accepted = (
        _describe_range(integer, gt, ge, lt, le) + (" (finite)" if finite else "") + (" or None" if optional else "")
    )
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    number = int(value) if integer else float(value)  # type: ignore[call-overload]  # an Integral when integer
    ok = not (isinstance(number, float) and math.isnan(number))
    ok = ok and not (finite and isinstance(number, float) and math.isinf(number))
    ok = ok and (gt is None or number > gt) and (ge is None or number >= ge)
    ok = ok and (lt is None or number < lt) and (le is None or number <= le)
    if not ok:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (``np.bool_`` included); strings such as ``"false"`` are refused."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_choice(name: str, value: T, choices: Sequence[Any], *, optional: bool = False) -> T:
    """``value`` if it is one of ``choices`` (or ``None`` with ``optional``)."""
    if value is None and optional:
        return value
    if isinstance(value, str) and value in choices:
        return value
    if not isinstance(value, str) and any(value is c for c in choices):
        return value
    accepted = ", ".join(map(repr, choices)) + (" or None" if optional else "")
    raise ValueError(f"`{name}` must be one of {accepted}, got {value!r}.")


def check_patterns(name: str, value: Any, *, optional: bool = False) -> list[str] | None:
    """``value`` as a list of strings (``fnmatch`` patterns); a single string is refused, as is anything else."""
    if value is None and optional:
        return None
    accepted = "a list of strings" + (" or None" if optional else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    patterns = list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return patterns
