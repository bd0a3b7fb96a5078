"""Gradients through time: how far back a recurrent model's output still depends on its inputs.

In a recurrence the gradient that reaches the input of step ``t - k`` is a product of ``k`` Jacobians
``W_h^T diag(f'(h))``: it vanishes or explodes geometrically with the spectrum of ``W_h``. These functions measure
that product directly, by autograd on a probe batch: the gradient of a fixed random projection of the output at the
last timestep with respect to the input at every earlier timestep, its norm against the lag normalised to lag 0.
For a linear recurrence ``h_t = a h_{t-1} + x_t`` the profile is exactly ``|a|^k``.

Only the input tensor is differentiated (``torch.autograd.grad(..., inputs=[x])``): no parameter's ``.grad``
changes, so a probe leaves the run as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["decay_per_step", "lag_sensitivity", "memory_horizon", "state_sensitivity"]


def lag_sensitivity(
    run: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    reverse: bool = False,
    output_slice: slice | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sensitivity of the last output to the input ``k`` steps earlier, for every lag ``k``, relative to lag 0.

    Args:
        run: maps an input sequence ``(batch, time, ...)`` to outputs ``(batch, time, hidden)``; it is called once.
        inputs: the probe sequence, batch first (it is copied; the original is never touched).
        reverse: measure a recurrence that runs backwards in time (the second direction of a bidirectional RNN):
            the output at the *first* timestep against the inputs after it.
        output_slice: the hidden units to project (one direction's half of a bidirectional output).
        generator: for the random projection (a fixed one gives the same direction on every probe).

    Returns:
        A float32 tensor of length ``time``: element ``k`` is the mean over the batch of the gradient norm at lag
        ``k`` divided by that at lag 0 (``nan`` where lag 0's gradient is zero).
    """
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = run(x)
        if out.dim() < 3 or out.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"`run` must return outputs of shape (batch, time, hidden) for inputs {tuple(x.shape)}, "
                f"got {tuple(out.shape)}."
            )
        hidden = out[:, 0] if reverse else out[:, -1]
        hidden = hidden.reshape(hidden.shape[0], -1)
        if output_slice is not None:
            hidden = hidden[:, output_slice]
        direction = torch.randn(hidden.shape[1], generator=generator, dtype=torch.float32).to(hidden)
        (grad,) = torch.autograd.grad((hidden * direction).sum(), [x])
    per_step = torch.linalg.vector_norm(grad.reshape(grad.shape[0], grad.shape[1], -1).float(), dim=2).mean(0)
    by_lag = per_step if reverse else per_step.flip(0)
    return by_lag / by_lag[0]


def memory_horizon(profile: Tensor, threshold: float = 1e-3) -> int:
    """The first lag whose sensitivity is below ``threshold`` (``len(profile)`` when none is: the whole sequence)."""
    below = (profile < threshold).nonzero()
    return int(below[0, 0]) if below.numel() else int(profile.numel())


def decay_per_step(profile: Tensor, floor: float = 1e-30) -> float:
    """The geometric mean factor by which the sensitivity changes per timestep (``|a|`` for ``h_t = a h_{t-1} +
    x_t``): ``(s_K / s_0) ** (1 / K)`` up to the last lag ``K`` whose sensitivity is still above ``floor``, where float32
    underflow has not yet made it exactly zero. Below 1 it vanishes, above 1 it explodes."""
    alive = (profile > floor).nonzero()
    last = int(alive[-1, 0]) if alive.numel() else 0
    if last == 0:
        return 0.0
    return float(profile[last] / profile[0]) ** (1.0 / last)


def state_sensitivity(
    step: Callable[[Tensor, Any], tuple[Tensor, Any]],
    inputs: Tensor,
    *,
    output_slice: slice | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """How a change of the recurrent state ``k`` steps before the end reaches the last output: the norm of the
    product of the state Jacobians (``W_h^T diag(f'(h))`` per step), for every lag ``k >= 1``, relative to lag 1.

    Unlike :func:`lag_sensitivity` this leaves out how each input enters the state, so a gated cell that learns to
    let an early input in and keep it (more sensitive to the first input than to the last, by design) is not
    mistaken for a product of Jacobians that grows: above 1 the recurrence itself amplifies.

    Args:
        step: ``step(x_t, state) -> (output, state)`` runs one timestep (``x_t`` of shape ``(batch, 1, ...)``,
            ``output`` of shape ``(batch, 1, hidden)``, ``state`` ``None`` at the start, a tensor or a tuple of
            tensors, e.g. an LSTM's ``(h, c)``).
        inputs: the probe sequence, batch first.
        output_slice: the hidden units to project.
        generator: for the random projection.

    Returns:
        A float32 tensor of length ``time``: element ``k`` is the norm (over the batch) of the gradient with respect
        to the state after input ``time - 1 - k``, divided by that at lag 1; element 0 is 1.
    """
    x = inputs.detach().clone().requires_grad_(True)
    states: list[tuple[Tensor, ...]] = []
    with torch.enable_grad():
        state: Any = None
        for t in range(x.shape[1]):
            out, state = step(x[:, t : t + 1], state)
            if t < x.shape[1] - 1:
                states.append(tuple(state) if isinstance(state, (tuple, list)) else (state,))
        hidden = out[:, -1].reshape(out.shape[0], -1)
        if output_slice is not None:
            hidden = hidden[:, output_slice]
        direction = torch.randn(hidden.shape[1], generator=generator, dtype=torch.float32).to(hidden)
        flat = [s for group in states for s in group]
        grads = torch.autograd.grad((hidden * direction).sum(), flat, allow_unused=True) if flat else ()
    norms, at = [], 0
    for group in states:
        parts = [g for g in grads[at : at + len(group)] if g is not None]
        at += len(group)
        squares = [p.float().pow(2).sum() for p in parts]  # the whole batch's norm: only the ratio to lag 1 counts
        norms.append(torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=x.device))
    by_lag = torch.stack(norms[::-1]) if norms else torch.zeros(0, device=x.device)  # lag 1 first
    one = torch.ones(1, device=x.device)
    return torch.cat([one, by_lag / by_lag[0]]) if by_lag.numel() else one
