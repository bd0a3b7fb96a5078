"""Collectives: the few all-reduces gradwatch needs, each an identity without a process group."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _reduced(values: Tensor, op: Any, group: Any = None) -> Tensor:
    """``values`` all-reduced with ``op`` over ``group`` (default: every rank; a collective); ``values`` itself
    without a process group.

    NCCL reduces CUDA tensors only: a host tensor (e.g. layer sizes) makes the round trip through the device.
    """
    if not _initialized():
        return values
    device = values.device
    if device.type == "cpu" and "nccl" in str(dist.get_backend(group)):
        reduced = values.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        reduced = values.clone()
    dist.all_reduce(reduced, op=op, group=group)
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


def _mesh_dims(t: Tensor) -> list[tuple[Any, Any]]:
    """``(placement, process group)`` for each mesh dimension of more than one rank that a DTensor is laid out on;
    empty for a plain tensor."""
    placements, mesh = getattr(t, "placements", None), getattr(t, "device_mesh", None)
    if placements is None or mesh is None:
        return []
    return [(placement, mesh.get_group(d)) for d, placement in enumerate(placements) if mesh.size(d) > 1]


def _is_shard(placement: Any) -> bool:
    # Shard, and FSDP-over-TP's _StridedShard (whose is_shard() is False): whatever neither replicates nor sums
    return not (placement.is_replicate() or placement.is_partial())


class ShardReduction:
    """How per-tensor values taken on local shards (norms, element counts) combine into the full tensors' values.

    A DTensor is reduced over each mesh dimension it is sharded along (``Shard``: its pieces add up), and over no
    other: along a ``Replicate`` dimension every rank holds the same values, so summing there would count them
    once per replica (HSDP's replicas, FSDP x TP's replicated layers); a ``Partial`` dimension holds summands of
    the tensor, not pieces, and is summed on the tensors themselves before any norm (:func:`sum_partials`). A
    plain tensor of a sharded strategy (FSDP1's flat shards) is reduced over every rank.

    The reduction is one collective per distinct process group, over the values of the tensors sharded along it,
    in the order the groups first appear among the tensors: the same order on every rank of a group, since every
    rank holds the same parameters. Built on the host from the placements, without a collective.
    """

    def __init__(self, tensors: Sequence[Tensor], plain_sharded: bool) -> None:
        self.size = len(tensors)
        members: dict[int, tuple[Any, list[int]]] = {}  # id(group) -> (group, positions); None: every rank
        if _initialized():
            for i, t in enumerate(tensors):
                if hasattr(t, "placements"):
                    groups = [g for placement, g in _mesh_dims(t) if _is_shard(placement)]
                else:
                    groups = [None] if plain_sharded else []
                for group in groups:
                    members.setdefault(id(group), (group, []))[1].append(i)
        #: ``(group, positions)``: positions ``None`` when every tensor takes part (no gather, no scatter)
        self.steps: list[tuple[Any, tuple[int, ...] | None]] = [
            (group, None if len(positions) == self.size else tuple(positions)) for group, positions in members.values()
        ]
        self._indices: dict[tuple[int, torch.device], Tensor] = {}

    @property
    def reduces(self) -> bool:
        """Whether any collective is needed (False without a process group, or with every tensor replicated)."""
        return bool(self.steps)

    def sum(self, values: Tensor) -> Tensor:
        """Per-tensor ``values`` (shape ``(N,)``, or ``(N, k)``: k values each) summed over the shards of each
        tensor (collectives)."""
        return self._apply(values, dist.ReduceOp.SUM) if self.steps else values

    def max(self, values: Tensor) -> Tensor:
        """Per-tensor ``values`` maximised over the shards of each tensor (collectives)."""
        return self._apply(values, dist.ReduceOp.MAX) if self.steps else values

    def norms(self, norms: Tensor, norm_type: float) -> Tensor:
        """Per-tensor norms of local shards made the norms of the full tensors (collectives)."""
        if not self.steps:
            return norms
        if math.isinf(norm_type):
            return self.max(norms)
        return self.sum(norms.double().pow(norm_type)).pow(1.0 / norm_type).to(norms.dtype)

    def _apply(self, values: Tensor, op: Any) -> Tensor:
        out = values
        for k, (group, positions) in enumerate(self.steps):
            if positions is None:
                out = _reduced(out, op, group)
                continue
            index = self._indices.get((k, out.device))
            if index is None:
                index = self._indices[(k, out.device)] = torch.tensor(positions, dtype=torch.int64, device=out.device)
            out = out.index_copy(0, index, _reduced(out.index_select(0, index), op, group))
        return out


_PARTIAL_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}


def partial_dims(t: Tensor) -> list[tuple[Any, Any]]:
    """``(Partial placement, process group)`` of each mesh dimension along which DTensor ``t`` holds summands
    (asked of every gradient on every step of a DTensor model: the usual answer, none, costs no group look-up)."""
    placements = getattr(t, "placements", None)
    if placements is None or not any(placement.is_partial() for placement in placements):
        return []
    return [(placement, g) for placement, g in _mesh_dims(t) if placement.is_partial()]


def sum_partials(locals_: list[Tensor], dims: list[list[tuple[Any, Any]]]) -> list[Tensor]:
    """The local tensors ``locals_`` with their pending ``Partial`` reductions done (``dims[i]``: those of the
    i-th, from :func:`partial_dims`): new tensors, the inputs untouched. One collective per (group, reduction,
    dtype), over every tensor that shares it, flattened into one buffer: not one per tensor."""
    out = list(locals_)
    depth = max((len(d) for d in dims), default=0)
    for level in range(depth):  # a tensor partial along two dimensions is summed along one, then the other
        buckets: dict[tuple[int, str, torch.dtype], tuple[Any, str, list[int]]] = {}
        for i, d in enumerate(dims):
            if level < len(d):
                placement, group = d[level]
                op = str(placement.reduce_op)
                buckets.setdefault((id(group), op, out[i].dtype), (group, op, []))[2].append(i)
        for group, op, members in buckets.values():
            flat = torch.cat([out[i].reshape(-1) for i in members])
            summed = _reduced(flat, getattr(dist.ReduceOp, _PARTIAL_OPS.get(op, "SUM")), group)
            if op == "avg":
                summed = summed / dist.get_world_size(group)
            for i, piece in zip(members, summed.split([out[i].numel() for i in members]), strict=True):
                out[i] = piece.view_as(out[i])
    return out
