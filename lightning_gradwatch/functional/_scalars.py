"""Elementwise operations on one value that is either a 0-dim tensor (the device path: no host sync) or a Python
float (the CPU's host path, where reading a value costs nothing and a float operation is a hundred times cheaper than
a tensor one). The scalar rules in :mod:`~lightning_gradwatch.functional.clipping` are written once against these.

Python floats follow IEEE like tensors do (``inf - inf`` is NaN, comparisons with NaN are False) except that a
division by zero raises: :func:`div` gives what a tensor division gives instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: A 0-dim tensor on the device path, a float (bool for flags) on the host path.
Scalar = Tensor | float
Flag = Tensor | bool


def where(condition: Flag, a: Scalar, b: Scalar) -> Scalar:
    if isinstance(condition, Tensor):
        return torch.where(condition, a, b)
    return a if condition else b


def div(a: Scalar, b: Scalar) -> Scalar:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a / b
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def clamp_min(x: Scalar, low: float) -> Scalar:
    if isinstance(x, Tensor):
        return x.clamp_min(low)
    return x if math.isnan(x) or x > low else low  # NaN stays NaN, as with a tensor


def clamp_max(x: Scalar, high: float) -> Scalar:
    if isinstance(x, Tensor):
        return x.clamp_max(high)
    return x if math.isnan(x) or x < high else high


def minimum(a: Scalar, b: Scalar) -> Scalar:
    """The smaller of two values; NaN if either is (like ``torch.minimum``)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a_t = a if isinstance(a, Tensor) else torch.full_like(b, a)  # type: ignore[arg-type]
        b_t = b if isinstance(b, Tensor) else torch.full_like(a_t, b)
        return torch.minimum(a_t, b_t)
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x) if x >= 0 else math.nan


def isfinite(x: Scalar) -> Flag:
    return torch.isfinite(x) if isinstance(x, Tensor) else math.isfinite(x)


def isnan(x: Scalar) -> Flag:
    return torch.isnan(x) if isinstance(x, Tensor) else math.isnan(x)


def as_float(flag: Flag) -> Scalar:
    """1.0 where ``flag`` is true, else 0.0."""
    return flag.float() if isinstance(flag, Tensor) else float(flag)
