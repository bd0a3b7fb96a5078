"""SetupCheck: the mistakes in training code and settings that break a run without any textbook pathology."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._loss_trace import LossHistory
from lightning_gradwatch._params import local_tensor, optimizer_index
from lightning_gradwatch._probe_batch import CAN_RUN_EAGERLY, ForwardFn, check_forward_fn, run_eagerly
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._step import StepGradients, host_is_free
from lightning_gradwatch._types import FinitePositiveFloat, Null, PositiveInt
from lightning_gradwatch._validation import check_number, check_patterns
from lightning_gradwatch.activations._probe import compiled_modules
from lightning_gradwatch.alerts import Alert, AlertKind
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.diagnosis._setup_rules import (
    DIVERGENCE_FACTOR,
    EARLY_STEPS,
    RECHECK_STEP,
    Coverage,
    ResetWatch,
    learning_rate_verdict,
)
from lightning_gradwatch.functional.dynamics import snapshot_for_update, update_norms

#: Update ratios are measured on this many first steps (a copy of the weights at each, freed at the next).
RATIO_STEPS = 3


class SetupCheck(GradwatchCallback):
    r"""Name the mistakes in the training code and its settings, at the step they show, with what to change.

    - ``learning_rate``: the learning rate is far too high. The loss grew ten-fold from where the run started and
      stays there (a divergence, named before it ends in NaN), or over the first 10 steps it rose while each update
      moved the weights by a tenth of their norm or more (``update_ratio_high``; a healthy run: about 1e-3) and it
      is not back below its start (at step 9; at step 15 when it is coming back: falling on each of the last steps).
    - ``not_in_optimizer``: parameters that receive gradients but belong to no optimizer (``configure_optimizers``
      passed only part of the model): they never learn, and their gradients pile up.
    - ``no_gradient``: parameters in an optimizer, with ``requires_grad``, whose gradient is still ``None`` after
      ``no_gradient_after_steps`` steps. A warning when their module runs in forward and what it returns feeds a
      layer that learns (a ``.detach()`` or a ``torch.no_grad()`` block cuts them off from the loss); ``info`` when
      it feeds nothing that learns (a pooler a token classifier does not read) or never runs (a spare branch).
      ``ignore`` leaves named layers out.
    - ``gradients_not_reset``: an optimizer steps with gradients that still hold those of its previous step (manual
      optimization without ``zero_grad()``), checked on its first steps.

    Everything is decided from host-side facts (which ``.grad`` exists, tensor identities and version counters) or
    rides on the step's shared read; the update ratios cost one copy of the weights on each of the first three
    steps. fp16 without loss scaling is :class:`GradientNormLogger`'s ``gradient_underflow``. Under ``torch.compile``
    the one forward pass whose dataflow ``no_gradient`` reads is a pass of its own, run eagerly after a step, in
    eval mode and without gradients: the compiled graph gets no hook.

    Args:
        no_gradient_after_steps: optimizer steps without a gradient after which a parameter is named; ``None``
            disables the check.
        ignore: ``fnmatch`` patterns of parameter or layer names the optimizer and gradient checks leave out.
        update_ratio_high: the largest update-to-weight ratio of the first steps above which a rising loss means
            the learning rate is too high.
        log_every_n_steps: on a GPU, judge the loss every this many steps (it rides on NaNGuard's read, or costs
            one transfer); ``None`` follows the Trainer. On a CPU it is judged on every step.
        forward_fn: under ``torch.compile`` only: ``forward_fn(module, batch)`` runs the model on a training batch
            for the dataflow; default ``module(batch)``, ``module(batch[0])`` for a tuple or list.

    Raises:
        ValueError: an argument outside its range, naming it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import SetupCheck

        trainer = Trainer(callbacks=[SetupCheck(ignore=["pooler"])])
    """

    hook_order = HookOrder.SETUP_CHECK  # right after the guard: a dropped update shows nothing (skipped)
    single_instance = True

    def __init__(
        self,
        no_gradient_after_steps: PositiveInt | Null = 20,
        ignore: list[str] | None = None,
        update_ratio_high: FinitePositiveFloat = 0.1,
        log_every_n_steps: PositiveInt | Null = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        positive_int: dict[str, Any] = {"ge": 1, "integer": True, "optional": True}
        self.no_gradient_after_steps = check_number("no_gradient_after_steps", no_gradient_after_steps, **positive_int)
        self.ignore = check_patterns("ignore", [] if ignore is None else ignore) or []
        self.update_ratio_high = check_number("update_ratio_high", update_ratio_high, gt=0, finite=True)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, **positive_int)
        self.forward_fn = check_forward_fn(forward_fn)
        self._compiled = False  # under torch.compile the dataflow comes from an eager pass of its own
        self._flow_due = False  # record it at the end of this batch
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._coverage = Coverage(self.ignore, self.no_gradient_after_steps)
        self._resets = ResetWatch()
        self._before: list[Tensor] | None = None  # the weights before the previous early step
        self._ratios: list[Tensor | float] = []  # the median update ratio of each early step
        self._posted_at = -1  # the step whose history was posted on the shared read
        self._posted_on_logging_step = False
        self._stepped_at: int | None = None  # the step just taken, to judge at the end of its batch
        self._device = torch.device("cpu")

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._reset_run_state()
        # before torch 2.6 the dataflow is recorded from the training forward (hooks a compiled graph may skip)
        self._compiled, self._flow_due = CAN_RUN_EAGERLY and bool(compiled_modules(pl_module)), False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resets.attach(trainer.optimizers)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resets.detach()
        self._coverage.stop_watching()
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._resets.detach()
        self._coverage.stop_watching()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if not trainer.training or host_is_free(loss.device) or not self._judged_now(trainer):
            return
        values = [*session_of(trainer).loss_trace.device_values(), *(self._ratio_tensor(loss.device),)]
        session_of(trainer).shared_read.post(
            self, torch.cat([v.reshape(-1).float() for v in values]), trainer.global_step
        )
        self._posted_at = trainer.global_step
        self._posted_on_logging_step = self._should_log(trainer, self.log_every_n_steps)

    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if step.repeat:
            return
        now = trainer.global_step
        index = optimizer_index(trainer, optimizer)
        self._emit(
            trainer, AlertKind.GRADIENTS_NOT_RESET, f"optimizer{index}", self._resets.verdict(now, optimizer, index)
        )
        if now < EARLY_STEPS or self._should_log(trainer, self.log_every_n_steps):
            found = self._coverage.not_in_optimizer(now, pl_module, trainer.optimizers)
            self._emit(trainer, AlertKind.NOT_IN_OPTIMIZER, "", found)
        if not step.dropped:
            self._coverage.observe(step.params)
            if self.no_gradient_after_steps is not None and self._coverage.steps == self.no_gradient_after_steps // 2:
                if self._compiled:  # hooks would not reach the compiled graph: a pass of its own, after the step
                    self._flow_due = True
                else:
                    self._coverage.watch_calls(pl_module)
            if self._coverage.steps == self.no_gradient_after_steps or self._should_log(
                trainer, self.log_every_n_steps
            ):
                found = self._coverage.no_gradient(now, pl_module, trainer.optimizers)
                self._emit(trainer, AlertKind.NO_GRADIENT, "", found)
        if len(trainer.optimizers) == 1:  # the loss of several optimizers' objectives says nothing of one rate
            self._early_ratio(step, now)
            self._device = step.device
            self._stepped_at = now

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._flow_due:
            self._flow_due = False
            self._record_flow_eagerly(pl_module, batch)
        # judged after the step, when the guard's read (which the history may ride on) has been made
        if self._stepped_at is not None:
            step, self._stepped_at = self._stepped_at, None
            history = self._history(trainer, step)
            explained = any(a.kind == AlertKind.GRADIENTS_NOT_RESET for a in self.alerts)  # its growth says it all
            if history is not None and not explained:
                ratios = [float(r) for r in self._ratios] if host_is_free(self._device) else history[1]
                verdict = learning_rate_verdict(step, history[0], ratios, self.update_ratio_high)
                self._emit(trainer, AlertKind.LEARNING_RATE, "", verdict)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- internals -------------------------------------------------------------------------------------------
    def _record_flow_eagerly(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self._coverage.watch_calls(pl_module)
        try:
            run_eagerly(self.forward_fn, pl_module, batch)
        except Exception as err:  # a model or batch the pass cannot run: our pass, never the run's end (warned)
            self._coverage.forget_calls()
            rank_zero_warn(
                f"SetupCheck could not run the model on a training batch under torch.compile ({err}): parameters "
                "without a gradient will be named without telling a cut-off layer from an unused one.",
                category=UserWarning,
            )
        finally:
            self._coverage.stop_watching()

    def _emit(self, trainer: pl.Trainer, kind: str, key: str, verdict: Alert | None) -> None:
        """Each finding once per run: these mistakes do not clear by themselves."""
        if verdict is not None:
            self._set_condition(trainer, kind, key, True, lambda: verdict)

    def _judged_now(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step in (EARLY_STEPS - 1, RECHECK_STEP) or self._should_log(
            trainer, self.log_every_n_steps
        )

    def _early_ratio(self, step: StepGradients, now: int) -> None:
        """The median over parameters of the previous early step's ``||delta w|| / ||w||``, then a copy of the
        weights for the next one (on the first :data:`RATIO_STEPS` steps only)."""
        if self._before is None and now >= RATIO_STEPS:
            return  # past the early steps: no copy to compare with, none to take (a launch per weight on a GPU)
        weights = [local_tensor(p.detach()) for p in step.params]
        if self._before is not None and len(self._before) == len(weights):
            delta, before, _ = update_norms(self._before, weights, consume_before=True)
            ratios = torch.where(before > 0, delta / before.clamp_min(1e-30), math.nan)
            median = torch.nanmedian(ratios)
            self._ratios.append(float(median) if host_is_free(median.device) else median)
        self._before = snapshot_for_update(weights) if now < RATIO_STEPS and not step.dropped else None

    def _ratio_tensor(self, device: torch.device) -> Tensor:
        ratios = [r if isinstance(r, Tensor) else torch.tensor(r) for r in self._ratios]
        return torch.stack(ratios).to(device) if ratios else torch.zeros(0, device=device)

    def _history(self, trainer: pl.Trainer, step: int) -> tuple[LossHistory, list[float]] | None:
        """The loss history of the steps up to ``step`` on the host (with the early ratios) when it is free: on a
        CPU, or delivered with the step's shared read; on a logging step without a reader, one transfer of its own."""
        trace = session_of(trainer).loss_trace
        if host_is_free(self._device):
            if step >= EARLY_STEPS and step != RECHECK_STEP and not trace.may_diverge(DIVERGENCE_FACTOR):
                return None  # nothing to judge: spare building the history on every step
            return trace.host(), []
        if step != self._posted_at:
            return None
        delivered = session_of(trainer).shared_read.take(self, step)
        parts = trace.device_values()
        if delivered is None:
            if not self._posted_on_logging_step:
                return None  # the early step without a reader: judged at the first logging step
            delivered = [x for part in host_values(*parts, self._ratio_tensor(self._device)) for x in part]
        sizes = [t.numel() for t in parts]
        first, ring = delivered[: sizes[0]], delivered[sizes[0] : sizes[0] + sizes[1]]
        return trace.host([first, ring]), delivered[sizes[0] + sizes[1] :]
