"""GradScaler access for 16-mixed: is there a scaler, the unscaled loss, are an optimizer's gradients still scaled, did
it overflow, and making it skip a step.

Every function here reads device tensors without a host sync (``scaler._scale``, the per-optimizer found-inf flags)
instead of the scaler's public getters, which call ``.item()``. This is the one module that touches the scaler's
private fields.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The Trainer's enabled GradScaler (16-mixed), or ``None`` (32, bf16, DeepSpeed)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


def unscaled_loss(trainer: pl.Trainer, loss: Tensor) -> Tensor:
    """``loss`` as a detached 0-dim float32 device tensor, divided by the loss scale under 16-mixed, where the
    backward hooks receive the scaled loss (no sync)."""
    value = loss.detach().float().reshape(())
    scaler = grad_scaler(trainer)
    if scaler is not None and scaler._scale is not None:
        value = value / scaler._scale.to(value.device).reshape(())
    return value


def grads_are_scaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """True if ``optimizer``'s grads still carry the loss scale in ``on_before_optimizer_step``.

    Ordinary optimizers are unscaled by Lightning before the hook; fused ones (``Adam(fused=True)``)
    unscale inside their own step, so their grads are still scaled there.
    """
    scaler = grad_scaler(trainer)
    if scaler is None or scaler._scale is None:
        return False
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is None or state["stage"] is not OptState.UNSCALED


def grad_unscale_factor(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """``1 / scale`` as a device tensor when ``optimizer``'s grads are still scaled, else ``None`` (no sync)."""
    if not grads_are_scaled(trainer, optimizer):
        return None
    scaler = grad_scaler(trainer)
    assert scaler is not None and scaler._scale is not None
    return scaler._scale.double().reciprocal().float()


def scaler_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The GradScaler's own overflow flag for this step (a 0-dim float device tensor, 1.0 = overflow).

    ``None`` when there is no scaler or it has not unscaled this optimizer yet (fused optimizers). Valid only
    in ``on_before_optimizer_step``, between ``unscale_`` and ``update``. Reusing it costs no sync.
    """
    scaler = grad_scaler(trainer)
    if scaler is None:
        return None
    state = scaler._per_optimizer_states.get(id(optimizer))
    if state is None or state["stage"] is not OptState.UNSCALED or not state["found_inf_per_device"]:
        return None
    flags = list(state["found_inf_per_device"].values())
    total = flags[0].to(torch.float32)
    for f in flags[1:]:
        total = total + f.to(total.device, torch.float32)
    return total.clamp(max=1.0)


def scale_of(scaler: torch.amp.GradScaler) -> Tensor | None:
    """``scaler``'s current loss scale, a device tensor (``None`` before its first step): no sync."""
    return scaler._scale


def loss_scale(trainer: pl.Trainer, device: torch.device) -> Tensor:
    """The GradScaler's current loss scale as a tensor (0 without a scaler, or before its first step, made on
    ``device``, where a host zero would have to be copied): no sync."""
    scaler = grad_scaler(trainer)
    scale = scale_of(scaler) if scaler is not None else None
    return scale if scale is not None else torch.zeros((), device=device)


def force_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
    """Make the GradScaler skip ``optimizer``'s step where ``flag`` (a device flag) is set, as if its gradients had
    overflowed, without a sync: its found-inf flags are raised in place. Only once it has unscaled ``optimizer``
    (where :func:`scaler_found_inf` is not ``None``)."""
    scaler = grad_scaler(trainer)
    assert scaler is not None
    for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        found.copy_(torch.maximum(found, flag.to(found.device, found.dtype)))
