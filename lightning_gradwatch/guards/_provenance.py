"""Where a non-finite value was born: the input batch, the forward pass, the loss, or the backward pass.

Runs only on a fault (no cost on clean steps): the failing batch is checked for NaN/Inf, and its forward pass is
replayed once without gradients (as eager code under ``torch.compile``), with a forward hook on every leaf module
recording the norm and finiteness of its output in call order. The first module whose output is non-finite is where
the value was born; the growth of the layers' output norms before it tells an overflow (activations growing layer
by layer) from an operation that produced NaN from finite inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradwatch._params import clean_name
from lightning_gradwatch._probe_batch import eagerly
from lightning_gradwatch.alerts import AlertCause

#: A layer-to-layer growth of activation norms above this, sustained, is an explosion rather than one bad op.
EXPLODING_GROWTH = 1.5


_STAGE_CAUSES: dict[str, str] = {
    "input": AlertCause.BAD_INPUT,
    "forward": AlertCause.FORWARD_OP,
    "loss": AlertCause.LOSS_FUNCTION,
    "backward": AlertCause.BACKWARD_OP,
}


@dataclass(frozen=True)
class Origin:
    """Where a fault began. ``stage`` is ``"input"``, ``"forward"``, ``"loss"`` or ``"backward"``; ``where`` the
    batch, module or layer; ``growth`` the mean layer-to-layer growth of activation norms before a forward overflow."""

    stage: str
    where: str
    detail: str
    growth: float | None = None

    @property
    def cause(self) -> str:
        """The alert cause this origin points to (see ``lightning_gradwatch.alerts.ALERT_CAUSES``)."""
        if self.stage == "forward" and self.growth is not None and self.growth > EXPLODING_GROWTH:
            return AlertCause.EXPLODING_ACTIVATIONS
        return _STAGE_CAUSES.get(self.stage, "")


def non_finite_inputs(batch: Any) -> list[str]:
    """The positions (``"[0]"``, ``"['x']"``) of the floating-point tensors of ``batch`` holding NaN/Inf."""
    found: list[str] = []

    def visit(value: Any, path: str) -> None:
        if isinstance(value, Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(path or "the batch")
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{path}[{i}]")

    visit(batch, "")
    return found


@dataclass
class ForwardTrace:
    """Each leaf module's call in order: its name, its output's norm (float64, so it does not overflow) and
    finiteness, whether its input was finite, whether its output holds an Inf, and its weights' norm."""

    names: list[str]
    norms: list[float]
    finite: list[bool]
    inputs_finite: list[bool]
    has_inf: list[bool]
    weight_norms: list[float | None]  # None: no parameters (activations, pooling): not a layer of the depth profile


@contextlib.contextmanager
def _recording(module: nn.Module, trace: ForwardTrace) -> Iterator[None]:
    handles = []
    for name, child in module.named_modules():
        if any(True for _ in child.children()):
            continue

        def hook(
            _: nn.Module, inputs: Any, output: Any, name: str = clean_name(name), child: nn.Module = child
        ) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, Tensor) or not out.is_floating_point():
                return
            first = inputs[0] if inputs and isinstance(inputs[0], Tensor) and inputs[0].is_floating_point() else None
            weights = [p.detach().double() for p in child.parameters(recurse=False)]
            trace.names.append(name)
            trace.norms.append(float(torch.linalg.vector_norm(out.detach().double())))
            trace.finite.append(bool(torch.isfinite(out).all()))
            trace.inputs_finite.append(first is None or bool(torch.isfinite(first).all()))
            trace.has_inf.append(bool(torch.isinf(out).any()))
            trace.weight_norms.append(
                float(torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in weights]))) if weights else None
            )

        handles.append(child.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def replay_forward(module: nn.Module, run: Callable[[], Any]) -> tuple[ForwardTrace, bool | None]:
    """Run ``run`` (the failing batch's forward pass and loss) without gradients, with the random state restored
    afterwards; returns the trace and whether the returned loss was finite (``None`` if it returned none)."""
    trace = ForwardTrace([], [], [], [], [], [])
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        # as eager code under torch.compile: the hooks fire, and the fault path compiles nothing (no_grad alone would)
        with eagerly(), torch.no_grad(), _recording(module, trace):
            out = run()
    finally:
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    loss = out.get("loss") if isinstance(out, dict) else out
    return trace, (bool(torch.isfinite(loss).all()) if isinstance(loss, Tensor) else None)


def forward_origin(trace: ForwardTrace, loss_finite: bool | None) -> Origin | None:
    """The first module whose output is non-finite, and why: a non-finite input (the batch), activations that grew
    layer by layer until they overflowed, an overflow in one layer, or an operation on finite values; else the loss."""
    first = next((i for i, ok in enumerate(trace.finite) if not ok), None)
    if first is None:
        if loss_finite is False:
            return Origin("loss", "the loss", "the model's outputs were finite; the loss function made them non-finite")
        return None
    name = trace.names[first]
    if not trace.inputs_finite[first]:
        return Origin(
            "input",
            f"the input of '{name}'",
            f"the input of '{name}', the first module, already held NaN/Inf: the batch as training_step prepared it: a data bug",
        )
    layers = [i for i in range(first) if trace.weight_norms[i] is not None and trace.finite[i]]
    growth = _growth([trace.norms[i] for i in layers])
    if growth is not None and growth > EXPLODING_GROWTH:
        start = trace.names[layers[0]]
        detail = (
            f"activations grow about x{growth:.2g} per layer from '{start}' and overflow at '{name}': exploding "
            "activations; check the initialisation or add normalisation"
        )
        return Origin("forward", name, detail, growth)
    if trace.has_inf[first]:
        before = trace.norms[first - 1] if first else math.nan
        weights = trace.weight_norms[first]
        detail = (
            f"'{name}' overflowed float32 (input norm {before:.3g}"
            + (f", its weights' norm {weights:.3g}" if weights is not None else "")
            + "): exploding weights or activations, often after an earlier huge update; check the initialisation "
            "and the learning rate"
        )
        return Origin("forward", name, detail, math.inf)
    detail = f"'{name}' produced NaN from finite inputs (an operation such as log, sqrt, division or exp)"
    return Origin("forward", name, detail, growth)


def _growth(norms: list[float]) -> float | None:
    """The geometric mean of the layer-to-layer ratios of positive output norms (None with fewer than 3 layers)."""
    logs = [math.log(n) for n in norms if n > 0 and math.isfinite(n)]
    if len(logs) < 3:
        return None
    return math.exp((logs[-1] - logs[0]) / (len(logs) - 1))


def backward_origin(bad_gradients: list[str]) -> Origin:
    """The forward pass and loss were finite: the gradients went non-finite in the backward pass. The last such layer
    in model order is the first one backward reaches, and everything it feeds back into is poisoned by it."""
    where = bad_gradients[-1]
    return Origin(
        "backward",
        where,
        f"the forward pass was finite; the gradients turn non-finite at '{where}' in the backward pass (an operation "
        "with an infinite derivative there, such as sqrt or pow at 0)",
    )


@contextlib.contextmanager
def _muted_logging(module: nn.Module) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` as no-ops while a replay of ``training_step`` runs (it must not log twice)."""
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        del module.log, module.log_dict


def find_origin(trainer: Any, module: Any, batches: list[tuple[Any, int]], bad_gradients: list[str]) -> Origin | None:
    """Where a fault of this optimizer step began: the input batch, the forward pass or the loss (a replay of the
    failing batch's ``training_step``, in automatic optimization only: in manual optimization it would step the
    optimizers), or the backward pass. ``batches``: the step's ``(batch, batch_idx)``; ``bad_gradients``: the
    parameters whose gradients are non-finite, in model order. Under DDP every rank looks at its own batch and the
    origins are gathered (a collective, reached by every rank on the fault path), so all ranks name the same one:
    the earliest stage, on the lowest rank."""
    origin = _local_origin(trainer, module, batches, bad_gradients)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return origin
    gathered: list[Origin | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, origin)
    stages = ("input", "forward", "loss", "backward")
    found = [(stages.index(o.stage), rank, o) for rank, o in enumerate(gathered) if o is not None and o.stage in stages]
    if not found:
        return None
    _, rank, chosen = min(found, key=lambda item: item[:2])
    return Origin(chosen.stage, chosen.where, f"on rank {rank}, {chosen.detail}", chosen.growth)


def _local_origin(trainer: Any, module: Any, batches: list[tuple[Any, int]], bad_gradients: list[str]) -> Origin | None:
    for batch, index in batches:
        fields = non_finite_inputs(batch)
        if fields:
            where = f"batch {index} of epoch {trainer.current_epoch}"
            return Origin("input", where, f"the input batch ({where}) holds NaN/Inf in {', '.join(fields)}: a data bug")
    if module.automatic_optimization and batches:
        batch, index = batches[-1]
        try:
            with _muted_logging(module):
                trace, loss_finite = replay_forward(module, lambda: module.training_step(batch, index))
            origin = forward_origin(trace, loss_finite)
        except Exception:  # a replay the module does not support: report what is known without it
            origin = None
        if origin is not None:
            return origin
    return backward_origin(bad_gradients) if bad_gradients else None
