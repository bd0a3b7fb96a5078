"""Training-dynamics math: update-to-weight ratios and exact-zero gradient fractions; pure, no host syncs.

- The update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` per layer says how fast each layer moves
  (around 1e-3 per step is the usual rule of thumb, CS231n). It is read from the weights themselves, so it is right
  for any optimizer (fused and foreach kernels, Adam's bias correction, weight decay, schedulers, a GradScaler's
  skipped step) and in any parameter dtype: take :func:`snapshot_for_update` before the step, then
  :func:`update_ratios` after it.
- The fraction of gradient elements that are exactly zero per layer flags mixed-precision underflow (and dead
  units): :func:`zero_fractions`.

Per-tensor values are combined into per-group values like :func:`~lightning_gradwatch.functional.norms.
combine_norms` does; under sharding, combine the per-tensor values of :func:`update_norms` / :func:`nonzero_counts`
across ranks first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradwatch.functional.norms import combine_norms, tensor_norms

__all__ = ["nonzero_counts", "snapshot_for_update", "update_norms", "update_ratios", "zero_fractions"]


def _dense(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach() for t in tensors]


@torch.no_grad()
def snapshot_for_update(params: Sequence[Tensor], out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Copies of ``params`` as they are before the optimizer step: what :func:`update_ratios` needs, no more.

    The copies keep each parameter's dtype and device (bf16 weights are copied as bf16: the difference of two
    bf16 numbers within a factor 2 of each other is exact). Costs one ``foreach`` copy of the weights; pass the
    previous snapshot as ``out`` to reuse its memory.

    Args:
        params: the parameters (or their local shards) the optimizer is about to update.
        out: tensors shaped like ``params`` to copy into, e.g. an earlier snapshot; ``None`` allocates new ones.

    Returns:
        The snapshot, in the order of ``params``.

    Example::

        before = snapshot_for_update(params)
        optimizer.step()
        ratios = update_ratios(before, params, group_index, num_groups)
    """
    tensors = _dense(params)
    if not tensors:
        return []
    if out is None:
        return (
            [t.clone() for t in tensors] if any(t.is_sparse for t in tensors) else list(torch._foreach_mul(tensors, 1))
        )
    out = list(out)
    torch._foreach_copy_(out, tensors)
    return out


@torch.no_grad()
def update_norms(
    before: Sequence[Tensor], params: Sequence[Tensor], consume_before: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor ``||w_after - w_before||``, ``||w_before||`` and ``||w_after||``: three float32 vectors, on device.

    The differences are taken in the parameters' dtype and their norms accumulated in float32. With
    ``consume_before`` the differences are written into ``before`` (a snapshot about to be dropped): no allocation
    the size of the weights.
    """
    after = _dense(params)
    if len(before) != len(after):
        raise ValueError(f"`before` has {len(before)} tensors, `params` {len(after)}.")
    if not after:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty, empty
    before = list(before)
    weight_before = tensor_norms(before)
    if consume_before:
        torch._foreach_sub_(before, after)  # before - after: the same norm as the update
        deltas = before
    else:
        deltas = list(torch._foreach_sub(after, before))
    return tensor_norms(deltas), weight_before, tensor_norms(after)


def update_ratios(before: Sequence[Tensor], params: Sequence[Tensor], group_index: Tensor, num_groups: int) -> Tensor:
    """Per-group update-to-weight ratio ``||delta w|| / ||w_before||``, float32 of shape ``(num_groups,)``.

    Args:
        before: :func:`snapshot_for_update` of ``params``, taken before the optimizer step.
        params: the same parameters after the step.
        group_index: the group of each tensor (``int64``, values in ``[0, num_groups)``), on the parameters' device.
        num_groups: the number of groups.

    Returns:
        The ratios. A group whose weights were all zero before the step (a zero-initialised layer) is measured
        against its weights after the step instead (1.0 when the step created them); a group that is zero before
        and after, or that has no tensors, gets 0. A frozen group (lr 0, or a skipped step) gets exactly 0.
        NaN or Inf weights give NaN or Inf.
    """
    delta, weight_before, weight_after = update_norms(before, params)
    if delta.numel() == 0:
        return torch.zeros(num_groups, dtype=torch.float32, device=group_index.device)
    index = group_index.to(delta.device)
    delta = combine_norms(delta, index, num_groups)
    weight = combine_norms(weight_before, index, num_groups)
    weight = torch.where(weight > 0, weight, combine_norms(weight_after, index, num_groups))
    return torch.where(weight > 0, delta / weight.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(delta))


@torch.no_grad()
def nonzero_counts(grads: Sequence[Tensor]) -> Tensor:
    """The number of non-zero elements of each tensor, as one float32 vector on the first tensor's device.

    The ``foreach`` 0-"norm" (the count of non-zero elements), accumulated in float32 whatever the dtype. NaN
    counts as non-zero; a sparse tensor counts its stored non-zero values.
    """
    tensors = _dense(grads)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return tensor_norms(tensors, 0.0)


def zero_fractions(grads: Sequence[Tensor], group_index: Tensor, num_groups: int, numels: Tensor) -> Tensor:
    """Per-group fraction of gradient elements that are exactly zero, float32 of shape ``(num_groups,)``.

    Args:
        grads: the gradients present this step (local shards under sharding).
        group_index: the group of each gradient (``int64``, values in ``[0, num_groups)``).
        num_groups: the number of groups.
        numels: the number of elements of each group (e.g. ``ParamGroups.group_numels``); keep a copy on the
            gradients' device to spare a host-to-device copy. Elements of parameters without a gradient that are
            counted here count as zeros.

    Returns:
        ``1 - non-zeros / numels`` per group; a group with no elements gets 0.

    Example::

        fractions = zero_fractions(grads, group_index, num_groups, numels)  # 1.0: a layer got no gradient at all
    """
    counts = nonzero_counts(grads)
    total = numels.to(counts.device, torch.float32)
    nonzero = torch.zeros(num_groups, dtype=torch.float32, device=counts.device)
    if counts.numel():
        nonzero.index_add_(0, group_index.to(counts.device), counts)
    return torch.where(total > 0, 1.0 - nonzero / total.clamp_min(1.0), torch.zeros_like(nonzero))
