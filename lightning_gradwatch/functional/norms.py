"""Gradient-norm math: pure functions on tensors, no Lightning, no host syncs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "combine_norms",
    "global_norm",
    "grouped_norms",
    "power_means",
    "tensor_norms",
    "total_norm",
    "validate_norm_type",
]


def validate_norm_type(norm_type: float | str, argument: str = "norm_type") -> float:
    """Return ``norm_type`` as a float (``"inf"`` -> ``math.inf``), or raise ``ValueError`` naming ``argument``."""
    if isinstance(norm_type, str):
        if norm_type.strip().lower() not in ("inf", "+inf", "infinity"):
            raise ValueError(f"`{argument}` must be a number >= 1 or 'inf', got {norm_type!r}.")
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise ValueError(f"`{argument}` must be a number >= 1 or 'inf', got {norm_type!r}.")
    value = float(norm_type)
    if math.isnan(value) or value < 1.0:
        raise ValueError(f"`{argument}` must be a number >= 1 or 'inf', got {norm_type!r}.")
    return value


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, device: torch.device | None = None) -> Tensor:
    """The norm of each tensor, as one float32 vector on ``device`` (default: the first tensor's device).

    Uses ``torch._foreach_norm`` once per (device, dtype) group: no host sync, no per-tensor kernel launch
    loop. Norms are accumulated in float32 so that fp16/bf16 gradients do not overflow. Sparse tensors
    contribute the norm of their stored values.
    """
    if len(tensors) == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    out_device = device if device is not None else tensors[0].device
    dense = [t._values() if t.is_sparse else t for t in tensors]
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(dense):
        if t.numel() > 0:  # an empty shard (FSDP) has norm 0; foreach_norm rejects it for ord=inf
            buckets.setdefault((t.device, t.dtype), []).append(i)
    if len(buckets) == 1 and len(next(iter(buckets.values()))) == len(dense):
        return _bucket_norms(dense, norm_type).to(out_device)
    result = torch.zeros(len(dense), dtype=torch.float32, device=out_device)
    for indices in buckets.values():
        norms = _bucket_norms([dense[i] for i in indices], norm_type)
        result.index_copy_(0, torch.tensor(indices, device=out_device), norms.to(out_device))
    return result


def _bucket_norms(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Norms of same-device, same-dtype tensors as float32; half precision is widened before reducing."""
    low_precision = tensors[0].dtype in (torch.float16, torch.bfloat16)
    norms = torch._foreach_norm(tensors, norm_type, dtype=torch.float32 if low_precision else None)
    return torch.stack(norms).to(torch.float32)


def combine_norms(norms: Tensor, group_index: Tensor, num_groups: int, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into per-group norms: ``(sum_i n_i^p)^(1/p)`` per group, or the max for ``inf``.

    Args:
        norms: per-tensor norms, shape ``(N,)``.
        group_index: the group of each tensor, ``int64`` of shape ``(N,)``, values in ``[0, num_groups)``.
        num_groups: the number of groups ``G``.
        norm_type: the ``p`` of the p-norm the per-tensor norms were taken with.

    Returns:
        Group norms of shape ``(G,)``. An empty group has norm 0.
    """
    out = torch.zeros(num_groups, dtype=norms.dtype, device=norms.device)
    if math.isinf(norm_type):
        return out.scatter_reduce_(0, group_index, norms, reduce="amax", include_self=True)
    if norm_type == 2.0:
        return out.index_add_(0, group_index, norms * norms).sqrt_()
    return out.index_add_(0, group_index, norms.pow(norm_type)).pow_(1.0 / norm_type)


def grouped_norms(
    tensors: Sequence[Tensor], group_index: Tensor, num_groups: int, norm_type: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Per-group norms and the total norm of ``tensors``, both on the first tensor's device, without a sync.

    Returns:
        ``(group_norms, total_norm)`` with shapes ``(G,)`` and ``()``.
    """
    norms = tensor_norms(tensors, norm_type)
    group_norms = combine_norms(norms, group_index.to(norms.device), num_groups, norm_type)
    return group_norms, total_norm(group_norms, norm_type)


def power_means(norms: Tensor, numels: Tensor, norm_type: float = 2.0) -> Tensor:
    """Size-independent magnitude of each group: ``norm / numel^(1/p)`` (the RMS for ``p=2``, the max for ``inf``).

    Comparing layers of different sizes by their raw norms favours the big ones; this does not.
    """
    if math.isinf(norm_type):
        return norms.clone()
    return norms / numels.to(norms.dtype).clamp_min(1).pow(1.0 / norm_type)


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of everything from the per-tensor norms ``norms`` (shape ``(N,)``): a 0-dim tensor."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    return torch.linalg.vector_norm(norms, math.inf if math.isinf(norm_type) else norm_type)


def global_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all ``tensors`` together, as a 0-dim float32 tensor (``foreach`` kernels, no sync)."""
    return total_norm(tensor_norms(tensors, norm_type), norm_type)
