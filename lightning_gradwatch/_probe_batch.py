"""The probe batch of the callbacks that run the model a second time, apart from the training step: GradientGeometry
and GradientsThroughTime on a slow cadence, and the activation callbacks under ``torch.compile``.

The probe runs eagerly (``eagerly``: a compiled model's own code, not its graph, so hooks and a TorchFunctionMode
see every call and the compiled graph gets neither), in eval mode with every module's flag restored exactly
(``eval_mode``), on a detached copy of (the first rows of) a training batch (``first_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

#: ``forward_fn(module, batch)``: run the model on a probe batch.
ForwardFn = Callable[[pl.LightningModule, Any], Any]
#: ``torch.compiler.set_stance`` (torch >= 2.6) runs compiled code as eager code; without it the passes that need it
#: are off under torch.compile (each callback says so).
CAN_RUN_EAGERLY = hasattr(torch.compiler, "set_stance")
#: With BatchNorm, a probe in eval mode waits this many steps for the running statistics it uses to settle.
BATCHNORM_WARMUP = 50


def default_forward(module: pl.LightningModule, batch: Any) -> Any:
    """``module(batch)`` for a tensor batch, ``module(batch[0])`` for a tuple or list (``(inputs, targets)``).

    Raises:
        TypeError: the module defines no ``forward``, or the batch is not a tensor or a sequence starting with one;
            the message says to pass ``forward_fn``.
    """
    if type(module).forward is nn.Module.forward:  # training_step calls a submodule: what to run is the user's call
        raise TypeError(
            f"{type(module).__name__} defines no forward(): pass `forward_fn=lambda module, batch: "
            "module.net(batch[0])` (what training_step runs)"
        )
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"the batch is a {type(batch).__name__}, not a tensor or a tuple starting with one: pass "
            "`forward_fn=lambda module, batch: module(...)`"
        )
    return module(batch)


def check_forward_fn(forward_fn: ForwardFn | None) -> ForwardFn:
    """``forward_fn`` as given, or :func:`default_forward` for ``None``.

    Raises:
        ValueError: not callable.
    """
    if forward_fn is None:
        return default_forward
    if not callable(forward_fn):
        raise ValueError(f"`forward_fn` must be a callable `forward_fn(module, batch)` or None, got {forward_fn!r}.")
    return forward_fn


def first_rows(batch: Any, n: int) -> Any:
    """A copy of the first ``n`` rows of every tensor in ``batch`` (tensors, lists, tuples and dicts of them)."""
    if isinstance(batch, Tensor):
        return batch[:n].detach().clone() if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)({k: first_rows(v, n) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        rows = [first_rows(v, n) for v in batch]
        return type(batch)(*rows) if hasattr(batch, "_fields") else type(batch)(rows)
    return batch


def tracks_batch_statistics(model: nn.Module) -> bool:
    """Whether eval mode changes what ``model`` computes through BatchNorm running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, every module's own ``training`` flag restored exactly afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def run_eagerly(forward_fn: ForwardFn, module: pl.LightningModule, batch: Any) -> None:
    """``forward_fn(module, batch)`` as eager code, in eval mode, without gradients: a pass of its own that leaves
    the run as it was (no graph, no dropout draw, no BatchNorm statistic, the training flags restored)."""
    with eagerly(), eval_mode(module), torch.no_grad():
        forward_fn(module, batch)


@contextmanager
def eagerly() -> Iterator[None]:
    """Run whatever is compiled with ``torch.compile`` as plain eager code inside: nothing is traced or recompiled,
    and the hooks and modes installed inside never reach a compiled graph (its guards are not even evaluated). A
    plain model runs as it would anyway; before torch 2.6 (no ``set_stance``) nothing changes."""
    if not CAN_RUN_EAGERLY:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
