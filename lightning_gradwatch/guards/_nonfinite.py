"""Naming what went non-finite in a faulty step: the loss, gradients, weights, buffers, optimizer state.

Runs only on a fault (the slow path), where a host sync per check is acceptable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._params import OptimizerParams, clean_name, layer_of, local_tensor
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.functional.finite import any_non_finite, may_be_non_finite, non_finite_mask
from lightning_gradwatch.guards._buffer_baseline import judged_buffers
from lightning_gradwatch.guards._snapshot import optimizer_state_tensors


def non_finite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN or an Inf (exact; one host read)."""
    if not named:
        return []
    mask = non_finite_mask([t for _, t in named]).tolist()
    return [name for (name, _), bad in zip(named, mask, strict=True) if bad]


def all_weights(module: nn.Module, index: OptimizerParams) -> list[tuple[str, Tensor]]:
    """Every weight of the model: the module's parameters (frozen ones and those of another optimizer included: a
    NaN there poisons the forward pass as surely), then those of ``index`` the module does not hold."""
    named = [(clean_name(n), local_tensor(p.detach())) for n, p in module.named_parameters()]
    held = {id(p) for p in module.parameters()}
    named += [("(unregistered)", local_tensor(p.detach())) for p in index.params if id(p) not in held]
    return named


def state_is_finite(module: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight of the model, ``optimizer``'s state and the module's float buffers (judged against what
    they held by design, see :mod:`~lightning_gradwatch.guards._buffer_baseline`) are all finite (exact; one host read)."""
    index = OptimizerParams.of(module, optimizer)
    state = optimizer_state_tensors(optimizer, index.params, index.names)
    return not non_finite_names(all_weights(module, index) + judged_buffers(module) + state)


def screened_tensors(
    module: nn.Module, optimizer: torch.optim.Optimizer, step: StepGradients, weights: bool, optimizer_state: bool
) -> list[Tensor]:
    """The float buffers (as judged against what they hold by design), and every weight and ``optimizer``'s state
    when asked: what a step's screen checks."""
    tensors = [b for _, b in judged_buffers(module)]
    if weights:  # every weight: a NaN in a frozen one poisons the forward pass as surely
        tensors += [t for _, t in all_weights(module, step.index)]
    if optimizer_state:
        tensors += [t for _, t in optimizer_state_tensors(optimizer, step.params, step.index.names)]
    return tensors


@dataclass(frozen=True)
class Fault:
    """What went non-finite in one step, for the alert and for the guard's choice of action."""

    text: str  # what went non-finite, for the message
    first_layer: str  # the alert's name: the source's layer, or "loss"
    count: int  # how many things (the loss, parameters, buffers) went non-finite
    weights: list[str]  # non-finite weights (dropping the update cannot repair them)
    buffers: list[str]  # non-finite float buffers
    optimizer_state: list[str]  # non-finite optimizer state entries
    gradients: list[str]  # parameters with non-finite gradients, in model order

    @property
    def poisoned_state(self) -> bool:
        """The model's own state holds NaN/Inf: only a restore from a clean copy repairs it."""
        return bool(self.weights or self.optimizer_state)


def describe_fault(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: StepGradients,
    loss_bad: bool,
    grads_bad: bool,
) -> Fault:
    """Name everything non-finite in this step. The weights, buffers and optimizer state are always checked: a NaN
    weight makes every later gradient NaN, so it, not the loss or the gradients, is named as the source."""
    names = step.index.names
    weights = non_finite_names(all_weights(module, step.index))
    buffers = non_finite_names(judged_buffers(module))
    opt_state = non_finite_names(optimizer_state_tensors(optimizer, step.params, names))
    grads = non_finite_names(
        [(names[i] or "(unregistered)", g) for g, i in zip(step.grads, step.positions, strict=True)]
    )
    parts, first, count = [], "", 0
    if weights:
        parts.append(f"the weights of {_some(weights)} (the source: every gradient through them is non-finite)")
        first, count = layer_of(weights[0]), len(weights)
    if opt_state:
        parts.append(f"the optimizer state of {_some(opt_state, 'entry')}")
        first, count = first or layer_of(opt_state[0].split(" (")[0]), count + len(opt_state)
    if loss_bad:
        parts.append("the loss")
        first, count = first or "loss", count + 1
    if grads:
        parts.append(f"the gradients of {_some(grads)}; first offending layer '{layer_of(grads[0])}'")
        first, count = first or layer_of(grads[0]), count + len(grads)
    elif grads_bad:  # non-finite on another rank only (sharded): the flag came from the reduction
        parts.append("the gradients (on another rank)")
    if buffers:
        parts.append(f"the buffers {_some(buffers, 'buffer')}")
        first, count = first or layer_of(buffers[0]), count + len(buffers)
    text = ", ".join(parts) or "the weights or buffers (on another rank)"
    return Fault(text, first, count, weights, buffers, opt_state, grads)


def half_precision_update(optimizer: torch.optim.Optimizer, step: StepGradients) -> str | None:
    """Why an update made float16 weights non-finite, when they are float16 with no GradScaler (``16-true``, a model
    cast to half): the optimizer's arithmetic itself runs in float16, where an Adam ``eps`` below 3e-8 is 0 and a
    small gradient's square underflows to 0, so the update divides by zero. ``None`` otherwise."""
    if step.has_scaler or not step.params or any(p.dtype != torch.float16 for p in step.params):
        return None
    eps = optimizer.param_groups[0].get("eps") if optimizer.param_groups else None
    zero_eps = isinstance(eps, float) and eps > 0 and float(torch.tensor(eps, dtype=torch.float16)) == 0.0
    why = (
        f" (its eps={eps:g} is 0 in float16: wherever a squared gradient underflows to 0 the update divides by zero)"
        if zero_eps
        else ""
    )
    return (
        "The weights and the optimizer state are float16 with no loss scaling: the optimizer's update made them "
        f"non-finite{why}."
    )


def _some(names: list[str], noun: str = "parameter") -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} {noun}(s) ({shown})"


def device_flag(flag: Tensor | bool, device: torch.device) -> Tensor:
    """``flag`` as a 0-dim bool tensor on ``device`` (a device tensor is moved, never read)."""
    if isinstance(flag, Tensor):
        return flag.to(device)
    return torch.full((), flag, dtype=torch.bool, device=device)


def screen_step(
    step: StepGradients, loss_bad: Tensor | bool, state: list[Tensor], read: Any
) -> tuple[bool, bool, bool]:
    """Whether the loss, the gradients and the ``state`` tensors (buffers, and weights or optimizer state when due)
    hold NaN/Inf, on every rank. One reduced flag and one host read (``read``, the step's shared read, which others
    ride on); the rare positive of the cheap 2-norm screen is confirmed exactly (a 2-norm overflows on huge but
    finite values). On a CPU the flags are read as they are made (free there): fewer tensor ops, the same verdict."""
    if step.host_is_free:
        grads_flag = 0.0 if math.isfinite(float(step.global_norm(2.0))) else 1.0
        state_flag = float(may_be_non_finite(state)) if state else 0.0
        flags: Tensor | list[float] = [float(loss_bad), grads_flag, state_flag]
    else:
        stacked = [
            device_flag(loss_bad, step.device),
            ~torch.isfinite(step.global_norm(2.0)),
            may_be_non_finite(state, step.device).to(step.device),
        ]
        flags = torch.stack(stacked).to(torch.float32)
    loss_is_bad, grads_are_bad, state_is_bad = (v > 0 for v in read(flags))
    if grads_are_bad or state_is_bad:
        exact = torch.stack([any_non_finite(step.grads), any_non_finite(state, step.device).to(step.device)]).float()
        grads_are_bad, state_is_bad = (v > 0 for v in all_reduce_max(exact).tolist())
    return loss_is_bad, grads_are_bad, state_is_bad
