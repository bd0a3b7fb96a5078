"""SetupCheck's rules: mistakes in the training code and its settings, decided on the host from what the step shows.

- Learning rate far too high: the loss grew ten-fold and stays there (a divergence), or over the first steps it
  rose while the updates were a tenth of the weights or more (a healthy run moves them by about 1e-3 per step) and
  it has not come back below where it started (judged at step 9, or at step 15 when at step 9 the loss is back
  below its start or fell on each of the last three steps: a high-rate recipe's first jolt that then trains).
- Parameters left out of the optimizer: they receive gradients (``requires_grad`` and used in ``forward``) but no
  optimizer holds them, so they never move; their gradients are never zeroed and pile up.
- Parameters that never receive a gradient: an optimizer holds them and they require grad, yet after some steps
  their ``.grad`` is still ``None``. One forward pass's dataflow between modules is recorded halfway
  (:class:`~lightning_gradwatch.diagnosis._dataflow.Dataflow`): their module runs and what it returns feeds a layer that
  learns, so a ``.detach()`` or a ``no_grad`` block cuts them off from the loss, a warning; what it returns feeds
  nothing that learns (a pooler a token classifier does not read), or it never runs (a spare branch): worth knowing.
- Gradients never reset: the gradient an optimizer steps with still holds the one it stepped with before, i.e.
  nothing zeroed it in between (manual optimization without ``zero_grad()``). Seen from the gradient tensors
  themselves: the same storage, and its version counter moved by exactly the number of accumulations autograd made
  into it (a ``zero_()`` or a new tensor would show), on the first steps of each optimizer.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_gradwatch._loss_trace import FIRST, LossHistory
from lightning_gradwatch._params import clean_name, layer_of
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.diagnosis._dataflow import Dataflow

#: A loss this many times where the run started, on this many recorded steps in a row, is a divergence.
DIVERGENCE_FACTOR, DIVERGENCE_STEPS = 10.0, 3
#: The early window: the loss rose by this factor over its first steps and is not back below its start by the end.
EARLY_STEPS, EARLY_RISE, EARLY_RECOVERY = 10, 1.15, 0.98
#: A rise whose last loss is back below the start is judged again here: the last of the steps the trace keeps.
RECHECK_STEP = FIRST - 1


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _layers(names: list[str]) -> list[str]:
    return list(dict.fromkeys(layer_of(n) for n in names))


def alert(step: int, kind: str, name: str, value: float, threshold: float, finding: str, severity: str) -> Alert:
    message = alert_message(kind, finding, severity)
    return Alert(step, kind, name, value, threshold, message, severity)  # type: ignore[arg-type]


def learning_rate_verdict(
    step: int, history: LossHistory, early_ratios: list[float], ratio_high: float
) -> Alert | None:
    """The learning rate is far too high: a divergence, or the early rise with huge updates (see the module)."""
    reference = history.reference()
    recent = [v for v in history.recent[-DIVERGENCE_STEPS:] if math.isfinite(v)]
    if reference is not None and reference > 0 and len(recent) == DIVERGENCE_STEPS:
        if min(recent) >= DIVERGENCE_FACTOR * reference:
            grown = history.divergence(DIVERGENCE_FACTOR)
            assert grown is not None
            finding = (
                f"Learning rate far too high at step {step}: {grown.describe()}, and it has stayed above "
                f"{DIVERGENCE_FACTOR:g}x its start for {DIVERGENCE_STEPS} steps: the run is diverging."
            )
            return alert(step, AlertKind.LEARNING_RATE, "", grown.factor, DIVERGENCE_FACTOR, finding, "warning")
    first = history.first
    if len(first) < EARLY_STEPS or not early_ratios or not all(math.isfinite(v) for v in first[:EARLY_STEPS]):
        return None
    start, early = first[0], first[1:EARLY_STEPS]
    peak = max(early)
    largest = max(early_ratios)
    if not (start > 0 and peak >= EARLY_RISE * start and largest >= ratio_high):
        return None
    # a rise coming back at the end of the window (its last loss below the start, or lower on each of the last
    # three steps: a high-rate recipe's first jolt, SGD at 20 on a word-level LSTM) is judged again at RECHECK_STEP;
    # a rate far too high leaves the loss hovering above its start
    last = first[EARLY_STEPS - 4 : EARLY_STEPS]
    falling = all(b < a for a, b in zip(last, last[1:], strict=False))
    coming_back = falling or first[EARLY_STEPS - 1] < EARLY_RECOVERY * start
    upto = RECHECK_STEP if coming_back else EARLY_STEPS - 1
    if step != upto or len(first) <= upto or not all(math.isfinite(v) for v in first[: upto + 1]):
        return None
    now = statistics.median(first[upto - 2 : upto + 1])
    if now < EARLY_RECOVERY * start:
        return None
    back = f", came down to {first[EARLY_STEPS - 1]:.4g} at step {EARLY_STEPS - 1}" if coming_back else ""
    finding = (
        f"Learning rate far too high: over the first {EARLY_STEPS} steps the loss rose from {start:.4g} to "
        f"{peak:.4g} (step {first.index(peak)}){back} and is still {now:.4g} at step {upto}, while each update moved "
        f"the weights by up to {largest:.3g} of their norm (median over parameters; a healthy run moves them by "
        "about 1e-3 per step)."
    )
    return alert(upto, AlertKind.LEARNING_RATE, "", largest, ratio_high, finding, "warning")


@dataclass
class Coverage:
    """Which trained parameters the optimizers hold and which have received a gradient so far."""

    ignore: list[str]
    no_gradient_after: int | None

    def __post_init__(self) -> None:
        self.received: set[int] = set()  # ids of optimizer parameters seen with a gradient
        self.steps = 0
        self._flow: Dataflow | None = None  # one forward pass's dataflow between modules, recorded halfway

    def _ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(layer_of(name), p) for p in self.ignore)

    def not_in_optimizer(self, step: int, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Alert | None:
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        names = [
            clean_name(n)
            for n, p in module.named_parameters()
            if p.requires_grad and p.grad is not None and id(p) not in held and not self._ignored(clean_name(n))
        ]
        if not names:
            return None
        layers = _layers(names)
        finding = (
            f"{len(names)} parameter(s) receive gradients but belong to no optimizer, so they never learn: "
            f"{_some(names)} (layers {_some(layers)}). Their gradients are never zeroed either, and pile up."
        )
        return alert(step, AlertKind.NOT_IN_OPTIMIZER, layers[0], float(len(names)), 0.0, finding, "warning")

    def observe(self, params: list[nn.Parameter]) -> None:
        """One optimizer step: note the parameters that have a gradient (host only: ``.grad`` is or is not None)."""
        self.steps += 1
        self.received.update(id(p) for p in params if p.grad is not None)
        if self._flow is not None and self._flow.recorded:
            self._flow.close()  # one forward pass recorded: enough

    def missing(self, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[tuple[str, nn.Parameter]]:
        """Parameters an optimizer holds, with ``requires_grad``, that have had no gradient on any step so far."""
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        return [
            (clean_name(n), p)
            for n, p in module.named_parameters()
            if p.requires_grad and id(p) in held and id(p) not in self.received and not self._ignored(clean_name(n))
        ]

    def watch_calls(self, module: nn.Module) -> None:
        """Halfway to the verdict: record one forward pass's dataflow between modules, to tell whether the modules
        owning the parameters without gradient run at all (an unused branch does not) and whether what they return
        feeds a layer that learns (a layer cut off by a detach does; a pooler nobody reads does not)."""
        self.stop_watching()
        self._flow = Dataflow(module)

    def forget_calls(self) -> None:
        """Drop the recorded dataflow (a pass that failed part-way records only part of the model)."""
        self.stop_watching()
        self._flow = None

    def stop_watching(self) -> None:
        """Stop recording (the graph recorded so far is kept)."""
        if self._flow is not None:
            self._flow.close()

    def no_gradient(self, step: int, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Alert | None:
        if self.no_gradient_after is None or self.steps < self.no_gradient_after:
            return None
        self.stop_watching()
        named = self.missing(module, optimizers)
        if not named:
            return None
        names = [n for n, _ in named]
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad) or 1
        share = sum(p.numel() for _, p in named) / trained
        flow = self._flow if self._flow is not None and self._flow.recorded else None
        ran = [n for n in names if flow is None or layer_of(n) in flow.called]
        learning = {layer_of(clean_name(n)) for n, p in module.named_parameters() if id(p) in self.received}
        # a layer whose output feeds a layer that learns, yet gets no gradient, is cut off (a detach, no_grad): a
        # detach cuts off everything before it, so one proven cut makes them all cut. One whose output feeds
        # nothing that learns is a dead end (a pooler a token classifier never reads), one that never runs a spare
        # branch: both worth knowing
        cut = ran if ran and (flow is None or any(flow.reaches(layer_of(n), learning) for n in ran)) else []
        layers = _layers(cut or names)
        unused = [n for n in names if n not in ran]
        if cut:
            finding = (
                f"{len(cut)} parameter(s) in an optimizer run in forward but have not received a gradient in "
                f"{self.steps} steps: {_some(cut)} (layers {_some(layers)}; {share:.0%} of the trained weights). "
                "Something between them and the loss stops the gradient: a .detach(), a torch.no_grad() block, .data "
                "or .item()."
            )
            if unused:
                finding += f" Never used in forward: {_some(unused)}."
        elif ran:
            finding = (
                f"{len(names)} parameter(s) in an optimizer have not received a gradient in {self.steps} steps: "
                f"{_some(ran)} run in forward, but what they return never reaches a layer that learns (an output the "
                "task does not read, such as a pooler a token classifier does not use)"
                + (f"; never used in forward: {_some(unused)}" if unused else "")
                + f" (layers {_some(layers)}; {share:.0%} of the trained weights). Freeze them, or leave them out "
                "with SetupCheck(ignore=[...])."
            )
        else:
            finding = (
                f"{len(names)} parameter(s) in an optimizer are never used in forward and have not received a "
                f"gradient in {self.steps} steps: {_some(names)} (layers {_some(layers)}; {share:.0%} of the trained "
                "weights): a branch the task does not need? Freeze it, or leave it out with SetupCheck(ignore=[...])."
            )
        return alert(step, AlertKind.NO_GRADIENT, layers[0], share, 0.0, finding, "warning" if cut else "info")


class ResetWatch:
    """Whether an optimizer's gradients were reset between two of its steps, on its first ``checks`` steps.

    After a step (the optimizer's step post-hook) each gradient tensor (a weak reference: a gradient set to ``None``
    is freed) and its version counter are noted and a post-accumulate hook counts autograd's accumulations into it;
    at the optimizer's next step a gradient that is the same tensor, whose version moved by exactly that count, was
    never zeroed (``zero_()`` moves the version once more). The hooks live for one step at a time.
    """

    def __init__(self, checks: int = 2) -> None:
        self.checks = checks
        self._pending: dict[int, tuple[list[nn.Parameter], list[tuple[Any, int]], list[int], list[Any]]] = {}
        self._done: dict[int, int] = {}
        self._hooks: list[Any] = []

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.detach()
        for optimizer in optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for *_, handles in self._pending.values():
            for handle in handles:
                handle.remove()
        self._pending, self._done = {}, {}

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        if self._done.get(key, 0) >= self.checks or key in self._pending:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        marks = [(weakref.ref(p.grad), p.grad._version) for p in params]
        counts = [0] * len(params)
        handles = [p.register_post_accumulate_grad_hook(_counter(counts, i)) for i, p in enumerate(params)]
        self._pending[key] = (params, marks, counts, handles)

    def verdict(self, step: int, optimizer: torch.optim.Optimizer, index: int) -> Alert | None:
        """At ``optimizer``'s step: were its gradients reset since its previous step?"""
        pending = self._pending.pop(id(optimizer), None)
        if pending is None:
            return None
        params, marks, counts, handles = pending
        for handle in handles:
            handle.remove()
        self._done[id(optimizer)] = self._done.get(id(optimizer), 0) + 1
        kept = sum(
            p.grad is not None and p.grad is ref() and count > 0 and p.grad._version - version == count
            for p, (ref, version), count in zip(params, marks, counts, strict=True)
        )
        if not params or kept < 0.5 * len(params):
            return None
        self._done[id(optimizer)] = self.checks  # found: no more hooks
        finding = (
            f"Gradients never reset at step {step}: {kept} of the {len(params)} gradients optimizer {index} steps with "
            "still hold the ones of its previous step (nothing zeroed them in between), so every step applies the sum "
            "of all gradients so far and the updates grow without bound."
        )
        return alert(step, AlertKind.GRADIENTS_NOT_RESET, f"optimizer{index}", float(kept), 0.0, finding, "warning")


def _counter(counts: list[int], i: int) -> Callable[[Any], None]:
    def count(_: Any) -> None:
        counts[i] += 1

    return count
