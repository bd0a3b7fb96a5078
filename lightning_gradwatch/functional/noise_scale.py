"""Gradient-noise-scale math (McCandlish et al. 2018, appendix A.1): pure functions on tensors, no host syncs.

The simple noise scale ``B_simple = tr(Sigma) / |G|^2`` compares the per-example gradient variance with the
squared norm of the true gradient. It is the batch size at which the noise in a mean gradient is as large as the
gradient itself: a batch well below it wastes steps on noise, one well above it wastes examples.

Two measurements give both terms: the squared norms of mean gradients over ``b_small`` and ``b_big`` examples.
For examples drawn independently, ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``; solving the two equations gives
unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` (:func:`noise_scale_terms`). Each estimate is noisy, so the
two terms are averaged separately (an exponential moving average, :func:`noise_scale_ema_update`) and divided
afterwards (:func:`noise_scale_readout`), as the paper does: the ratio of two noisy estimates is biased, the ratio
of two averages much less so.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "noise_scale_ema_update",
    "noise_scale_readout",
    "noise_scale_state",
    "noise_scale_terms",
]


def noise_scale_terms(
    small_sq_norm: Tensor, big_sq_norm: Tensor, b_small: float, b_big: float
) -> tuple[Tensor, Tensor]:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two squared gradient norms.

    Args:
        small_sq_norm: ``|G_small|^2``, the squared norm of the mean gradient over ``b_small`` examples.
        big_sq_norm: ``|G_big|^2``, the same over ``b_big`` examples.
        b_small: the smaller batch size (examples).
        b_big: the larger batch size; ``b_small < b_big``.

    Returns:
        ``(grad_sq, trace)``: ``|G|^2 ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)`` and
        ``tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)``, as float32 tensors. Either can be
        negative on a single measurement: only their averages are meaningful.

    Raises:
        ValueError: unless ``0 < b_small < b_big``.

    Example::

        grad_sq, trace = noise_scale_terms(torch.tensor(2.0), torch.tensor(1.25), 8, 32)  # 1.0 and 8.0
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}.")
    small = small_sq_norm.to(torch.float32)
    big = big_sq_norm.to(torch.float32)
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def noise_scale_state(device: torch.device | str | None = None) -> Tensor:
    """A fresh averaging state: ``[EMA(|G|^2), EMA(tr Sigma), weight]``, all zero, float32 on ``device``.

    ``weight`` is the total weight the average has received (``1 - decay^n`` after ``n`` updates), which undoes
    the pull towards the zero initial state (the bias correction of Adam).
    """
    return torch.zeros(3, dtype=torch.float32, device=device)


def noise_scale_ema_update(state: Tensor, grad_sq: Tensor, trace: Tensor, decay: float) -> Tensor:
    """Fold one pair of estimates into the averaging state; a non-finite pair is skipped, on device.

    Args:
        state: from :func:`noise_scale_state` or a previous update.
        grad_sq: an estimate of ``|G|^2`` (0-dim), e.g. from :func:`noise_scale_terms`.
        trace: an estimate of ``tr(Sigma)`` (0-dim).
        decay: the EMA decay in ``[0, 1)`` per update (0 keeps only the latest pair).

    Returns:
        The new state (``state`` itself is not modified). A pair with a NaN or Inf (an fp16 overflow step the
        GradScaler skips) leaves the state as it was, without a host sync.
    """
    sample = torch.stack([grad_sq.to(state), trace.to(state), torch.ones((), dtype=state.dtype, device=state.device)])
    valid = torch.isfinite(sample).all()
    safe = torch.where(valid, sample, torch.zeros_like(sample))  # keeps NaN/Inf out of the arithmetic
    return torch.where(valid, decay * state + (1.0 - decay) * safe, state)


def noise_scale_readout(state: Tensor) -> Tensor:
    """``[|G|^2, tr(Sigma), B_simple]`` from an averaging state, as one float32 tensor of 3 values.

    ``|G|^2`` and ``tr(Sigma)`` are the bias-corrected averages. ``B_simple`` is their ratio; it is NaN until
    a pair has been averaged, and whenever the averaged ``|G|^2`` is not positive (the gradient is lost in the
    noise of these batch sizes: ``B_simple`` is far above the larger batch, but not measurable).
    """
    weight = state[2]
    averages = state[:2] / weight  # NaN while the weight is 0
    grad_sq, trace = averages[0], averages[1]
    b_simple = torch.where(grad_sq > 0, trace / grad_sq, torch.full_like(grad_sq, float("nan")))
    return torch.stack([grad_sq, trace, b_simple])
