"""Collectives: the few all-reduces gradwatch needs, each an identity without a process group."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradwatch._compat import SHARDED_STRATEGIES


def is_sharded(trainer: pl.Trainer) -> bool:
    """True when gradients are sharded across ranks (FSDP, ModelParallelStrategy), so norms need a reduction."""
    return isinstance(trainer.strategy, SHARDED_STRATEGIES)


def distributed() -> bool:
    """Whether a process group of more than one rank is up (the reductions below are identities otherwise)."""
    return _initialized()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduced(values: Tensor, op: Any) -> Tensor:
    """``values`` all-reduced with ``op`` over every rank (a collective); ``values`` itself without a group.

    NCCL reduces CUDA tensors only: a host tensor (e.g. layer sizes) makes the round trip through the device.
    """
    if not _initialized():
        return values
    device = values.device
    if device.type == "cpu" and "nccl" in str(dist.get_backend()):
        reduced = values.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        reduced = values.clone()
    dist.all_reduce(reduced, op=op)
    return reduced.to(device)


def all_reduce_norms(norms: Tensor, norm_type: float) -> Tensor:
    """Combine per-tensor norms of local shards into norms of the full tensors across all ranks (collective)."""
    if math.isinf(norm_type):
        return _reduced(norms, dist.ReduceOp.MAX)
    return _reduced(norms.double().pow(norm_type), dist.ReduceOp.SUM).pow(1.0 / norm_type).to(norms.dtype)


def all_reduce_max(values: Tensor) -> Tensor:
    """Element-wise max of ``values`` over all ranks (a collective; identity without a process group)."""
    return _reduced(values, dist.ReduceOp.MAX)


def all_reduce_sum(values: Tensor) -> Tensor:
    """Element-wise sum of ``values`` over all ranks (a collective; identity without a process group)."""
    return _reduced(values, dist.ReduceOp.SUM)
