"""An optimizer's parameters: their names, their order, and the layers (groups) they are reported under."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch._distributed import ShardReduction
from lightning_gradwatch.functional.norms import combine_norms

_T = TypeVar("_T")
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "_forward_module"})


def clean_name(name: str) -> str:
    """Drop wrapper segments (FSDP, activation checkpointing, torch.compile) from a parameter or module name: a
    wrapper and the module it wraps get the same name (``encoder.0._orig_mod`` is ``encoder.0``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def layer_of(param_name: str) -> str:
    """The module that owns a parameter: ``"encoder.0.weight"`` -> ``"encoder.0"``; a root parameter is its own."""
    module, _, _ = param_name.rpartition(".")
    return module or param_name


def group_of(raw_name: str, by: str) -> str:
    """The name a parameter is reported under: its module (``by="module"``) or itself, wrappers dropped."""
    name = clean_name(raw_name)
    return layer_of(name) if by == "module" else name


def local_tensor(t: Tensor) -> Tensor:
    """The local part of a tensor: a DTensor's shard (FSDP2 / ModelParallelStrategy), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """The position of ``optimizer`` among the Trainer's optimizers (0 if it is not one of them)."""
    return next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)


@dataclass
class OptimizerParams:
    """An optimizer's parameters in model order, then those not registered on the module, with their names.

    Every gradwatch callback indexes the same list, so per-parameter results (the step's gradient norms) are
    computed once and shared; :meth:`grouping` maps them onto layers.
    """

    params: list[torch.nn.Parameter]
    names: list[str]  # wrappers dropped; "" for a parameter the module does not hold
    sharded: bool = False
    _groupings: dict[str, ParamGroups] = field(default_factory=dict, repr=False)
    _positions: dict[tuple[tuple[int, ...], torch.device], Tensor] = field(default_factory=dict, repr=False)
    # the optimizer's ``group["params"]`` lists as they were when this index was built, with their lengths: held,
    # so that a list freed and replaced cannot come back under the same ``id``
    _group_lists: list[tuple[list[Any], int]] = field(default_factory=list, repr=False)
    _group_param_ids: tuple[int, ...] = field(default=(), repr=False)
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    _reduction: ShardReduction | None = field(default=None, repr=False)

    @property
    def reduction(self) -> ShardReduction:
        """How per-parameter values of local shards combine into the full parameters' (over the mesh dimensions
        each is sharded along; an identity without sharding). Built on first use, on the host."""
        if self._reduction is None:
            self._reduction = ShardReduction(self.params, self.sharded)
        return self._reduction

    @property
    def has_dtensors(self) -> bool:
        """Whether some parameter is a DTensor (FSDP2, tensor parallelism): its gradient may hold summands."""
        return self.derived("has_dtensors", lambda: any(hasattr(p, "placements") for p in self.params))

    @classmethod
    def of(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool = False) -> OptimizerParams:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params, names, seen = [], [], set()
        for raw_name, p in module.named_parameters():
            if id(p) in in_optimizer and id(p) not in seen:
                params.append(p)
                names.append(clean_name(raw_name))
                seen.add(id(p))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    params.append(p)
                    names.append("")
                    seen.add(id(p))
        index = cls(params, names, sharded)
        index._group_lists = _group_lists(optimizer)
        index._group_param_ids = _group_param_ids(optimizer)
        return index

    def matches(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s parameter groups are still those this index was built from; on the host, no sync.

        The per-step check is one identity and one length per group (a group added with ``add_param_group``, a
        list extended or replaced all show). Only when that differs are the parameters themselves compared: an
        optimizer wrapper that hands out new lists of the same parameters keeps its index.
        """
        groups = optimizer.param_groups
        seen = self._group_lists
        if len(groups) == len(seen) and all(
            g["params"] is lst and len(lst) == n for g, (lst, n) in zip(groups, seen, strict=True)
        ):
            return True
        if _group_param_ids(optimizer) != self._group_param_ids:
            return False
        self._group_lists = _group_lists(optimizer)  # the same parameters in new lists: adopt the lists
        return True

    def derived(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """A value derived from these parameters (a per-parameter mask, say), built once per index: when the
        optimizer's groups change the dispatcher builds a new index, so a callback's value is rebuilt with it."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def position_index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """``positions`` as an int64 device tensor, made once per distinct set (no host-to-device copy per step)."""
        key = (positions, device)
        index = self._positions.get(key)
        if index is None:
            if len(self._positions) > 16:  # parameters come and go (e.g. unused branches): keep the cache small
                self._positions.clear()
            index = self._positions[key] = torch.tensor(positions, dtype=torch.int64, device=device)
        return index

    def grouping(self, by: str) -> ParamGroups:
        """The parameters grouped by owning module (``by="module"``) or one group per parameter (built once per
        index; under sharding building is a collective: every rank reaches it at the same step)."""
        groups = self._groupings.get(by)
        if groups is None:
            groups = self._groupings[by] = ParamGroups.build(self, by)
        return groups


def _group_lists(optimizer: torch.optim.Optimizer) -> list[tuple[list[Any], int]]:
    return [(g["params"], len(g["params"])) for g in optimizer.param_groups]


def _group_param_ids(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    # -1 separates groups: the same parameters regrouped are another layout (a group's options apply to them)
    return tuple(i for g in optimizer.param_groups for i in (*map(id, g["params"]), -1))


@dataclass
class ParamGroups:
    """How an optimizer's parameters (an :class:`OptimizerParams`) fall into reported groups (layers)."""

    index: OptimizerParams
    group_names: list[str]
    group_of_param: list[int]
    group_numels: Tensor  # elements per group across all shards, float64 on CPU
    _index_by_device: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, index: OptimizerParams, by: str) -> ParamGroups:
        group_names: list[str] = []
        group_ids: dict[str, int] = {}
        group_of_param: list[int] = []
        numels: list[int] = []
        for name, p in zip(index.names, index.params, strict=True):
            group = (layer_of(name) if by == "module" else name) if name else "(unregistered)"
            if group not in group_ids:
                group_ids[group] = len(group_names)
                group_names.append(group)
                numels.append(0)
            group_of_param.append(group_ids[group])
            numels[group_ids[group]] += local_tensor(p).numel()
        group_numels = torch.tensor(numels, dtype=torch.float64)
        if index.reduction.reduces:  # local shard sizes add up to the full layer sizes (over sharded dimensions)
            local = torch.tensor([local_tensor(p).numel() for p in index.params], dtype=torch.float64)
            full = index.reduction.sum(local)
            group_numels = torch.zeros(len(group_names), dtype=torch.float64).index_add_(
                0, torch.tensor(group_of_param, dtype=torch.int64), full
            )
        return cls(index, group_names, group_of_param, group_numels)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.index.params

    @property
    def names(self) -> list[str]:
        return self.index.names

    def group_index(self, device: torch.device) -> Tensor:
        """The group of each parameter as an int64 device tensor (made once per device: no transfer per step)."""
        index = self._index_by_device.get(device)
        if index is None:
            index = self._index_by_device[device] = torch.tensor(self.group_of_param, device=device)
        return index

    def combine(self, per_param: Tensor, norm_type: float) -> Tensor:
        """Per-group norms from per-parameter norms (``per_param[i]`` for ``params[i]``), on device."""
        return combine_norms(per_param, self.group_index(per_param.device), len(self.group_names), norm_type)
