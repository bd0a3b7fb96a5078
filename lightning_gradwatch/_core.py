"""Lightning glue shared by every gradwatch callback, kept in one place.

What lives here: alert emission (dedup, rank-zero logging, TensorBoard text), the logging cadence, the
single host transfer per logging step, the merged TensorBoard custom-scalars layout, the order of gradwatch
callbacks inside the Trainer, GradScaler access (scale, found-inf) and sharded-norm reduction. The tensor
math lives in :mod:`lightning_gradwatch.functional`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch.alerts import Alert
from lightning_gradwatch.functional.norms import combine_norms, tensor_norms

log = logging.getLogger("lightning_gradwatch")

_WRAPPER_PREFIXES = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|_forward_module)\.")
_LAYOUT_WRITTEN_ATTR = "_lightning_gradwatch_layout_written"


# ----------------------------------------------------------------------------------------------- validation
def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number > 0 (>= 0 with ``allow_zero``); NaN is rejected, inf allowed."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        accepted = "a number >= 0" if allow_zero else "a number > 0"
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


def check_positive_int(name: str, value: int | None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")


def check_fraction(name: str, value: float, *, open_low: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 < value <= 1`` (``0 <= value`` when not ``open_low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > 0 if open_low else value >= 0) and value <= 1
    if not ok:
        low = "0 <" if open_low else "0 <="
        raise ValueError(f"`{name}` must be a number with {low} {name} <= 1, got {value!r}.")


# ------------------------------------------------------------------------------------------ parameter names
def clean_name(name: str) -> str:
    """Drop wrapper segments (FSDP, activation checkpointing, torch.compile) from a parameter name."""
    return _WRAPPER_PREFIXES.sub("", name)


def layer_of(param_name: str) -> str:
    """The module that owns a parameter: ``"encoder.0.weight"`` -> ``"encoder.0"``; a root parameter is its own."""
    module, _, _ = param_name.rpartition(".")
    return module or param_name


def group_of(raw_name: str, by: str) -> str:
    """The name a parameter is reported under: its module (``by="module"``) or itself, wrappers dropped."""
    name = clean_name(raw_name)
    return layer_of(name) if by == "module" else name


@dataclass
class ParamGroups:
    """The parameters of one optimizer, in model order, with the layer (group) each belongs to."""

    params: list[torch.nn.Parameter]
    names: list[str]
    group_names: list[str]
    group_of_param: list[int]
    group_numels: Tensor  # elements per group across all shards, float64 on CPU
    sharded: bool = False
    _index_by_device: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer, by: str, sharded: bool = False
    ) -> ParamGroups:
        """Group ``optimizer``'s parameters by owning module (``by="module"``) or one per parameter.

        With ``sharded=True`` (FSDP) this is a collective: every rank must call it, at the same point.
        """
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params, names, group_names, group_of_param = [], [], [], []
        group_ids: dict[str, int] = {}
        numels: list[int] = []
        for raw_name, p in module.named_parameters():
            if id(p) not in in_optimizer:
                continue
            name = clean_name(raw_name)
            group = group_of(raw_name, by)
            if group not in group_ids:
                group_ids[group] = len(group_names)
                group_names.append(group)
                numels.append(0)
            params.append(p)
            names.append(name)
            group_of_param.append(group_ids[group])
            numels[group_ids[group]] += local_tensor(p).numel()
        group_numels = torch.tensor(numels, dtype=torch.float64)
        if sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(group_numels)  # local shard sizes add up to the full layer sizes
        return cls(params, names, group_names, group_of_param, group_numels, sharded)

    def present_grads(self) -> tuple[list[Tensor], list[int]]:
        """The local gradient tensors that exist this step and the positions of their parameters."""
        grads, positions = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            grads.append(local_tensor(g))
            positions.append(i)
        return grads, positions

    def group_index(self, device: torch.device) -> Tensor:
        index = self._index_by_device.get(device)
        if index is None:
            index = self._index_by_device[device] = torch.tensor(self.group_of_param, device=device)
        return index

    def layer_norms(self, tensors: list[Tensor], positions: list[int], norm_type: float) -> Tensor:
        """Per-group norms of ``tensors`` (the local parts of the parameters at ``positions``), on device.

        Under sharding the per-parameter norms of the local shards are all-reduced first (a collective);
        a parameter with no local tensor on some rank counts as zero there.
        """
        local = tensor_norms(tensors, norm_type)
        device = local.device
        per_param = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        per_param.index_copy_(0, torch.tensor(positions, device=device), local)
        if self.sharded:
            per_param = all_reduce_norms(per_param, norm_type)
        return combine_norms(per_param, self.group_index(device), len(self.group_names), norm_type)


def local_tensor(t: Tensor) -> Tensor:
    """The local part of a tensor: a DTensor's shard (FSDP2 / ModelParallelStrategy), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """The position of ``optimizer`` among the Trainer's optimizers (0 if it is not one of them)."""
    return next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)


# ---------------------------------------------------------------------------------------- precision / scaler
def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The Trainer's enabled GradScaler (16-mixed), or ``None`` (32, bf16, DeepSpeed)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


def grads_are_scaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """True if ``optimizer``'s grads still carry the loss scale in ``on_before_optimizer_step``.

    Ordinary optimizers are unscaled by Lightning before the hook; fused ones (``Adam(fused=True)``)
    unscale inside their own step, so their grads are still scaled there.
    """
    scaler = grad_scaler(trainer)
    if scaler is None or scaler._scale is None:
        return False
    from torch.amp.grad_scaler import OptState

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
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states.get(id(optimizer))
    if state is None or state["stage"] is not OptState.UNSCALED or not state["found_inf_per_device"]:
        return None
    flags = list(state["found_inf_per_device"].values())
    total = flags[0].to(torch.float32)
    for f in flags[1:]:
        total = total + f.to(total.device, torch.float32)
    return total.clamp(max=1.0)


# ------------------------------------------------------------------------------------------------ sharding
def is_sharded(trainer: pl.Trainer) -> bool:
    """True when gradients are sharded across ranks (FSDP, ModelParallelStrategy), so norms need a reduction."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def _reduced(values: Tensor, op: Any) -> Tensor:
    """``values`` all-reduced with ``op`` over every rank (a collective); ``values`` itself without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    reduced = values.clone()
    dist.all_reduce(reduced, op=op)
    return reduced


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


# ------------------------------------------------------------------------------------------------ logging
def host_values(*tensors: Tensor) -> list[list[float]]:
    """Bring several device tensors to the host in one transfer (one sync); returns each one flattened."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = [t.detach().reshape(-1).to(device, torch.float32) for t in tensors]
    values = torch.cat(flat).tolist()
    out, start = [], 0
    for t in flat:
        out.append(values[start : start + t.numel()])
        start += t.numel()
    return out


def logger_step(trainer: pl.Trainer) -> int:
    """The step value Lightning's own loggers use for training metrics."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the Trainer's TensorBoard loggers (rank zero only; empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def gradwatch_callbacks(trainer: pl.Trainer) -> list[GradwatchCallback]:
    """The Trainer's gradwatch callbacks in list order, with those inside a bundle (``GradWatch``) expanded."""
    found: list[GradwatchCallback] = []
    for callback in trainer.callbacks:
        if isinstance(callback, GradwatchCallback):
            found.append(callback)
        else:
            found.extend(getattr(callback, "gradwatch_callbacks", ()))
    return found


#: Lines per custom-scalars chart: about what TensorBoard's palette tells apart.
CHART_LINES = 10
#: Charts per metric: a larger model gets more lines per chart instead of more charts.
MAX_CHARTS = 24


def layer_charts(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Split layer names (in model order) into charts of related, consecutive layers: ``(title, names)`` each.

    Layers are grouped by their module path (``encoder.*`` apart from ``decoder.*``); a group with more lines
    than a chart holds is split at the next level down (``encoder.layers.0`` apart from ``encoder.layers.1``),
    and small neighbouring groups share a chart. A chart holds at most ``max(CHART_LINES, ceil(n / MAX_CHARTS))``
    lines, so no metric gets more than about ``MAX_CHARTS`` charts. Titles name the first and last layer.
    """
    names = list(names)
    if not names:
        return []
    limit = max(CHART_LINES, math.ceil(len(names) / MAX_CHARTS))

    def split(group: list[str], depth: int) -> list[list[str]]:
        if len(group) <= limit:
            return [group]
        if all(depth >= len(name.split(".")) for name in group):  # nothing left to split on (repeated names)
            return pack([[name] for name in group], len(group))
        children: list[list[str]] = []
        for name in group:  # consecutive runs sharing the path component at ``depth``
            parts = name.split(".")
            key = parts[depth] if depth < len(parts) else None
            if children and key is not None and children[-1][0].split(".")[depth : depth + 1] == [key]:
                children[-1].append(name)
            else:
                children.append([name])
        if len(children) == 1:
            return split(group, depth + 1)  # a prefix every layer here shares (``net.``): look one level down
        return pack([piece for child in children for piece in split(child, depth + 1)], len(group))

    def pack(pieces: list[list[str]], total: int) -> list[list[str]]:
        # balanced: 21 layers make charts of 7, 7 and 7 rather than 10, 10 and 1
        target = math.ceil(total / math.ceil(total / limit))
        charts: list[list[str]] = []
        for piece in pieces:
            if charts and len(charts[-1]) + len(piece) <= target:
                charts[-1].extend(piece)
            else:
                charts.append(list(piece))
        return charts

    return [(_chart_title(chart), chart) for chart in split(names, 0)]


def _chart_title(names: list[str]) -> str:
    """``net: 0 … 12`` for ``net.0`` to ``net.12``; ``proj … head`` when the layers share no module path."""
    if len(names) == 1:
        return names[0]
    paths = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    first, last = ".".join(paths[0][common:]), ".".join(paths[-1][common:])
    span = f"{first} … {last}"
    return f"{'.'.join(paths[0][:common])}: {span}" if common else span


def exact_tags(prefix: str, names: Iterable[str]) -> str:
    """A regex matching exactly the tags ``prefix + name`` for ``names``."""
    return f"^{re.escape(prefix)}(?:{'|'.join(re.escape(n) for n in names)})$"


def merge_layouts(layouts: Iterable[Mapping[str, Mapping[str, list[Any]]]]) -> dict[str, dict[str, list[Any]]]:
    """Merge custom-scalars layouts ``{category: {chart: ["Multiline", [regex, ...]]}}``; later charts of the
    same category and title add their regexes to the earlier ones."""
    merged: dict[str, dict[str, list[Any]]] = {}
    for layout in layouts:
        for category, charts in layout.items():
            target = merged.setdefault(category, {})
            for title, (kind, tags) in charts.items():
                if title in target:
                    target[title][1].extend(t for t in tags if t not in target[title][1])
                else:
                    target[title] = [kind, list(tags)]
    return merged


# -------------------------------------------------------------------------------------------- base class
class GradwatchCallback(Callback):
    """Base class of the gradwatch callbacks: the alert contract, logging and layout plumbing.

    Subclasses put their work on each step's final gradients in :meth:`_before_optimizer_step` (not in
    ``on_before_optimizer_step``, which dispatches it in ``hook_order``), implement their other hooks, and call
    :meth:`_set_condition` / :meth:`_emit_alert`,
    :meth:`_should_log` and :meth:`_log_metrics`; they describe their TensorBoard charts in
    :meth:`_tensorboard_layout` and their resumable state in :meth:`_extra_state` / :meth:`_load_extra_state`.
    """

    #: Position among gradwatch callbacks on ``on_before_optimizer_step``: lower runs first.
    hook_order: ClassVar[int] = 50

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self._active_conditions: set[tuple[str, str]] = set()
        self._param_groups_cache: dict[tuple[int, str], ParamGroups] = {}

    # -- alerts ----------------------------------------------------------------------------------------------
    def _emit_alert(self, trainer: pl.Trainer, alert: Alert) -> None:
        """Record ``alert``, log it once on rank zero and write it to TensorBoard as text."""
        self.alerts.append(alert)
        if not trainer.is_global_zero:
            return
        log.warning("[%s] step %d: %s", alert.kind, alert.step, alert.message)
        for writer in tensorboard_writers(trainer):
            text = f"**{alert.kind}** `{alert.name or '(model)'}` value={alert.value:.4g} threshold={alert.threshold:.4g}  \n{alert.message}"
            writer.add_text(f"gradwatch/alerts/{alert.kind}", text, global_step=alert.step)

    def _set_condition(
        self, trainer: pl.Trainer, kind: str, key: str, firing: bool, make_alert: Callable[[], Alert]
    ) -> None:
        """Alert when the condition ``(kind, key)`` starts; stay silent while it persists; re-arm when it clears."""
        condition = (kind, key)
        if firing and condition not in self._active_conditions:
            self._active_conditions.add(condition)
            self._emit_alert(trainer, make_alert())
        elif not firing:
            self._clear_condition(kind, key)

    def _clear_condition(self, kind: str, key: str) -> None:
        """The condition ``(kind, key)`` no longer holds: its next onset is a new alert."""
        self._active_conditions.discard((kind, key))

    # -- logging ---------------------------------------------------------------------------------------------
    @staticmethod
    def _should_log(trainer: pl.Trainer, every_n_steps: int | None) -> bool:
        """Whether the step about to be taken is a logging step: the Trainer's cadence, or ``every_n_steps``."""
        if every_n_steps is None:
            return bool(trainer._logger_connector.should_update_logs)
        return (logger_step(trainer) + 1) % every_n_steps == 0

    @staticmethod
    def _log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Send host-side metrics to every Lightning logger at Lightning's training step (rank zero writes)."""
        if not metrics or not trainer.is_global_zero:
            return
        step = logger_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)

    # -- TensorBoard layout ----------------------------------------------------------------------------------
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        """This callback's custom-scalars charts: ``{category: {chart: ["Multiline", [tag regex, ...]]}}``."""
        return {}

    def _write_layout_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = [w for w in tensorboard_writers(trainer) if not getattr(w, _LAYOUT_WRITTEN_ATTR, False)]
        if not writers:
            return
        layout = merge_layouts(cb._tensorboard_layout(trainer, pl_module) for cb in gradwatch_callbacks(trainer))
        if not layout:
            return
        for writer in writers:
            writer.add_custom_scalars(layout)
            setattr(writer, _LAYOUT_WRITTEN_ATTR, True)

    # -- parameters ------------------------------------------------------------------------------------------
    def _param_groups(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, by: str
    ) -> ParamGroups:
        """``optimizer``'s parameters grouped ``by`` module or parameter, built once per fit and optimizer (under
        FSDP building is a collective, reached by every rank at the same step)."""
        key = (id(optimizer), by)
        groups = self._param_groups_cache.get(key)
        if groups is None:
            groups = ParamGroups.build(pl_module, optimizer, by, sharded=is_sharded(trainer))
            self._param_groups_cache[key] = groups
        return groups

    # -- hooks -----------------------------------------------------------------------------------------------
    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """A subclass's work on the final gradients of a step (unscaled, accumulated, all-reduced)."""

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The first gradwatch callback in the Trainer runs every gradwatch callback's step work, sorted by
        # hook_order: the guard sees the step first, norms are logged before any clipping, clipping comes last,
        # whatever order the user listed them in. (Reordering trainer.callbacks instead would mutate the list
        # Lightning is iterating.)
        peers = gradwatch_callbacks(trainer)
        if peers[0] is not self:
            return
        for callback in sorted(peers, key=lambda cb: cb.hook_order):
            callback._before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_groups_cache.clear()  # a new fit may bring new optimizers
        self._write_layout_once(trainer, pl_module)

    # -- state -----------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "alerts": [a.to_dict() for a in self.alerts],
            "active_conditions": sorted(list(c) for c in self._active_conditions),
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self._active_conditions = {(str(k), str(n)) for k, n in state_dict.get("active_conditions", [])}
        self._load_extra_state(state_dict)
