"""Gradient-clipping math: pure functions on tensors, no Lightning, no host syncs.

Every decision is taken on device with ``torch.where`` / ``clamp`` instead of a Python ``if`` on a tensor, so
none of these functions waits for the accelerator. Statistics are 0-dim float32 tensors (or a fixed-size
ring buffer) that the caller keeps; the update functions return new tensors and never modify their inputs.

The scalar rules (:func:`clip_coefficient`, :func:`ema_update`, :func:`zscore_threshold`) take Python floats as
well (bools for flags): on a CPU, where reading a value is free, the caller keeps its statistics as floats and
the same rule costs microseconds instead of a hundred tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_gradwatch.functional._scalars import (
    Flag,
    Scalar,
    as_float,
    clamp_max,
    clamp_min,
    div,
    isfinite,
    isnan,
    sqrt,
    where,
)
from lightning_gradwatch.functional.rings import ring_push, ring_quantile  # re-exported: they lived here

__all__ = [
    "agc_coefficients",
    "apply_clip_coefficient",
    "clip_coefficient",
    "ema_update",
    "ring_push",
    "ring_quantile",
    "zscore_threshold",
]


def clip_coefficient(norm: Scalar, threshold: Scalar, eps: float = 1e-6) -> Scalar:
    """``min(threshold / (norm + eps), 1)``, the factor that brings ``norm`` down to ``threshold``.

    A non-finite ``norm`` (an fp16 overflow step the GradScaler will skip, or a real NaN/Inf that is NaNGuard's
    business) gets the coefficient 1.0: multiplying by 0 or NaN would only hide or spread the problem. An
    infinite ``threshold`` (nothing learned yet) also gives 1.0.
    """
    coefficient = clamp_max(div(threshold, norm + eps), 1.0)
    return where(isfinite(norm), where(isnan(coefficient), 1.0, coefficient), 1.0)


def ema_update(
    mean: Scalar, var: Scalar, count: Scalar, value: Scalar, decay: float, valid: Flag
) -> tuple[Scalar, Scalar, Scalar]:
    """One step of an exponentially weighted mean and variance of ``value``, skipped where ``valid`` is False.

    The weight of the new value is ``max(1 - decay, 1 / (count + 1))``: the first values are averaged plainly
    (no bias towards the zero initial state, and the variance is the ordinary variance of the values seen so
    far) and the update becomes a fixed-rate EMA after ``1 / (1 - decay)`` values. Incremental form of West
    (1979): ``mean += w * d``, ``var = (1 - w) * (var + w * d**2)`` with ``d = value - mean``.

    Args:
        mean, var, count: the current state, 0-dim float32 tensors or floats (``count`` counts the values folded
            in).
        value: the new observation. Ignored wherever ``valid`` is False, even if it is NaN or Inf.
        decay: the EMA decay in ``(0, 1)``.
        valid: a 0-dim bool tensor or a bool: whether to fold ``value`` in.

    Returns:
        The new ``(mean, var, count)``.
    """
    weight = clamp_min(div(1.0, count + 1.0), 1.0 - decay)
    safe = where(valid, value, mean)  # keeps NaN/Inf out of the arithmetic, not only out of the result
    delta = safe - mean
    new_mean = mean + weight * delta
    new_var = (1.0 - weight) * (var + weight * delta * delta)
    return where(valid, new_mean, mean), where(valid, new_var, var), count + as_float(valid)


def zscore_threshold(
    mean: Scalar,
    var: Scalar,
    count: Scalar,
    z_threshold: float,
    warmup_steps: int,
    warmup_cap: float | None,
    norm: Scalar | None = None,
) -> Scalar:
    """The clipping threshold of the z-score rule, once ``warmup_steps`` values are known.

    Without ``norm``: the ceiling ``mean + z_threshold * std``. With ``norm``: the norm that this gradient
    norm is clipped to, ``mean + z_threshold * std * z_threshold / z`` where ``z = (norm - mean) / std`` is
    above ``z_threshold`` (the ceiling otherwise): a norm just above the ceiling is clipped to it, a far
    outlier close to the mean, so that a spike's unusual direction moves the weights no further than an
    ordinary step would (the reciprocal scaling of ZClip).

    During warm-up the threshold is ``warmup_cap * mean`` (a generous safety cap against a spike before the
    statistics are ready) once at least one value is known, or ``inf`` (no clipping) when ``warmup_cap`` is
    None or nothing is known yet.
    """
    std = sqrt(clamp_min(var, 0.0))
    margin = z_threshold * std
    if norm is not None:
        z = div(norm - mean, std + 1e-12)
        margin = margin * (z_threshold / clamp_min(z, z_threshold))
        margin = where(isnan(margin), 0.0, margin)
    adaptive = mean + margin
    warm = math.inf if warmup_cap is None else where(count > 0, mean * warmup_cap, math.inf)
    return where(count >= warmup_steps, adaptive, warm)


def agc_coefficients(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    clip_factor: float,
    eps: float = 1e-3,
    grad_scale: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Unit-wise clip coefficients of Adaptive Gradient Clipping (Brock et al., NFNets 2021).

    A unit is one output row of a weight (dimension 0; the rest is flattened): its gradient norm may be at
    most ``clip_factor * max(||W_unit||, eps)``. Returns, for each pair, a coefficient tensor shaped to
    broadcast against the gradient (``(rows, 1, ..., 1)``), 1.0 where the unit is within its limit or its
    gradient norm is not finite; and the largest ``||G_unit|| / max_norm`` over all units (0-dim).

    Args:
        weights, grads: parameters and their gradients, pairwise, each at least 2-D.
        clip_factor: the lambda of the paper.
        eps: the floor of a unit's weight norm (zero-initialised units would otherwise never move).
        grad_scale: ``1 / loss scale`` when the gradients are still scaled (a fused optimizer under fp16):
            norms are compared unscaled, the coefficients apply to the scaled gradients unchanged.
    """
    coefficients: list[Tensor] = []
    ratios: list[Tensor] = []
    for w, g in zip(weights, grads, strict=True):
        shape = (-1,) + (1,) * (g.dim() - 1)
        g_norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float32)
        if grad_scale is not None:
            g_norm = g_norm * grad_scale.to(g_norm.device)
        w_norm = torch.linalg.vector_norm(w.detach().reshape(w.shape[0], -1), dim=1, dtype=torch.float32)
        max_norm = w_norm.clamp_min(eps) * clip_factor
        coefficient = cast(Tensor, clip_coefficient(g_norm, max_norm, eps=1e-12))  # tensors in: a tensor
        coefficients.append(coefficient.reshape(shape).to(g.dtype))
        ratios.append((g_norm / max_norm).amax())
    if not coefficients:
        return [], torch.zeros(())
    device = grads[0].device
    return coefficients, torch.stack([r.to(device) for r in ratios]).amax()


def apply_clip_coefficient(grads: Sequence[Tensor], coefficient: Scalar) -> None:
    """Multiply ``grads`` in place by ``coefficient`` (0-dim tensor or float), with one ``foreach`` kernel per
    device and dtype.

    Like ``torch.nn.utils.clip_grad_norm_``, the multiplication always happens (by 1.0 when nothing is
    clipped): deciding whether to skip it would need a host sync. (On a CPU, where reading the coefficient is free,
    the caller may skip the call instead.)
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in buckets.items():
        torch._foreach_mul_(group, coefficient.to(device) if isinstance(coefficient, Tensor) else coefficient)
