"""GradientsThroughTime: the memory horizon of recurrent models, on a slow cadence."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gradwatch._distributed import is_sharded
from lightning_gradwatch._loss_trace import fetch_with_history
from lightning_gradwatch._params import clean_name
from lightning_gradwatch._probe_batch import (
    CAN_RUN_EAGERLY,
    ForwardFn,
    check_forward_fn,
    eagerly,
    first_rows,
    run_eagerly,
)
from lightning_gradwatch._reporting import host_values, logger_step
from lightning_gradwatch._types import GreaterThanOne, NonNegativeInt, OpenUnitInterval, PositiveInt
from lightning_gradwatch._validation import check_bool, check_number
from lightning_gradwatch.activations._probe import compiled_modules
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback
from lightning_gradwatch.core.session import session_of
from lightning_gradwatch.functional.through_time import (
    decay_per_step,
    lag_sensitivity,
    memory_horizon,
    state_sensitivity,
)
from lightning_gradwatch.geometry._through_time_report import HorizonReading, draw_profiles, write_profiles
from lightning_gradwatch.geometry._through_time_rules import LossLevel, exploding_finding, vanishing_finding

#: ``probe(module, batch) -> (inputs, run)``: the sequence a user-written recurrence reads, batch first, and the
#: function that runs the recurrence on it and returns its outputs ``(batch, time, hidden)``.
RecurrenceProbe = Callable[[pl.LightningModule, Any], tuple[Tensor, Callable[[Tensor], Tensor]]]


@dataclass
class HorizonState:
    """What is checkpointed: each module's run of consecutive short-horizon probes, ``[step, loss median,
    horizon]`` each, and the last reading of each module (for the report)."""

    streaks: dict[str, list[list[float]]] = field(default_factory=dict)
    readings: dict[str, dict[str, Any]] = field(default_factory=dict)


class GradientsThroughTime(GradwatchCallback):
    r"""Measure how far back in time the gradient of every recurrent module reaches, every ``every_n_steps`` on a
    probe batch, and alert when it vanishes or explodes through time.

    In a recurrence the gradient that reaches the input of step ``t - k`` is a product of ``k`` Jacobians
    ``W_h^T diag(f'(h))``: it vanishes or explodes geometrically with the spectrum of ``W_h`` (Bengio et al. 1994,
    Pascanu et al. 2013). On a probe step, after the optimizer step, each ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``
    (bidirectional and multi-layer included) is run again, in eval mode, on the first ``probe_size`` sequences it
    saw in that step, from a zero initial state; the gradient of a fixed random projection of its output at the last
    timestep is taken with respect to its input at every earlier timestep (the first timestep, for the backward
    direction). Its norm against the lag, relative to lag 0, is the sensitivity profile; the **horizon** is the first
    lag where it falls below ``threshold``, and the **decay per step** its geometric mean factor per timestep (the
    ``|a|`` of ``h_t = a h_{t-1} + x_t``, whose profile is ``a^k``). Only the inputs are differentiated: no
    parameter's gradient, no statistic and no random stream of the run changes. Steps that are not probed cost a
    step-counter comparison: no hook, no sync.

    - ``vanishing_through_time``: the horizon shorter than ``short_fraction`` of the sequence at every probe
      (three at least) over ``patience_steps`` steps, not reaching further back than at the earlier ones, while the loss has not improved and is
      still near where the run started. A gated cell on a plateau reaches further back at each probe as it learns
      to remember; a converged language model that needs only a short context has learned: both are silent.
    - ``exploding_through_time``: the recurrence amplifies: a change of its state ``k`` steps back reaches the last
      output ``exploding_factor`` times more than one a step back (the product of the state Jacobians, measured
      one timestep at a time, when the input profile grows that much). For a bidirectional module or a cell loop the input profile's growth stands in, in
      a run whose loss is not clearly below where it started (a gated cell that learns to keep an early input is
      more sensitive to it than to the last one, by design).

    A recurrence written as a Python loop over a cell is probed with ``recurrences={"name": probe}``, where
    ``probe(module, batch)`` returns the input sequence (batch first) and a function running the recurrence on it.

    Under ``torch.compile`` the training forward gets no hook: on a probe step the first ``probe_size`` rows of the
    batch are run once more, as the model's own eager code, in eval mode and without gradients (``forward_fn``), to
    capture what each recurrent module reads; the probe itself runs eagerly too. The compiled graph is untouched.

    Logs ``gradwatch/through_time/horizon/{module}``, ``gradwatch/through_time/decay_per_step/{module}``,
    ``gradwatch/through_time/probe_seconds`` and the profile picture ``gradwatch/through_time/profile`` (with
    matplotlib); the health report gets a line per module.

    Args:
        every_n_steps: probe every this many optimizer steps (steps 0, ``every_n_steps``, ...).
        probe_size: sequences of the step's batch used for the probe.
        threshold: the sensitivity (relative to lag 0) below which an input no longer reaches the output.
        short_fraction: a horizon shorter than this share of the sequence length counts as short.
        patience_steps: how long the horizon stays short, the loss flat, before ``vanishing_through_time``
            (in optimizer steps, whatever the cadence).
        exploding_factor: the sensitivity at some lag, relative to lag 0, from which it explodes.
        recurrences: user-written recurrences, ``{name: probe}`` (see above).
        pictures: draw the profile picture (TensorBoard and the report folder).
        seed: seed of the random projection (the same direction at every probe).
        forward_fn: under ``torch.compile`` only: ``forward_fn(module, batch)`` runs the model on the probe rows;
            default ``module(batch)``, ``module(batch[0])`` for a tuple or list.

    Raises:
        ValueError: an argument out of range, or a ``recurrences`` value that is not callable.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientsThroughTime

        trainer = Trainer(callbacks=[GradientsThroughTime(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 100,
        probe_size: PositiveInt = 16,
        threshold: OpenUnitInterval = 1e-3,
        short_fraction: OpenUnitInterval = 0.5,
        patience_steps: PositiveInt = 500,
        exploding_factor: GreaterThanOne = 10.0,
        recurrences: dict[str, RecurrenceProbe] | None = None,
        pictures: bool = True,
        seed: NonNegativeInt = 19940301,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_number("every_n_steps", every_n_steps, ge=1, integer=True)
        self.probe_size = check_number("probe_size", probe_size, ge=1, integer=True)
        self.threshold = check_number("threshold", threshold, gt=0, lt=1)
        self.short_fraction = check_number("short_fraction", short_fraction, gt=0, lt=1)
        self.patience_steps = check_number("patience_steps", patience_steps, ge=1, integer=True)
        self.exploding_factor = check_number("exploding_factor", exploding_factor, gt=1)
        if recurrences is not None and (
            not isinstance(recurrences, dict)
            or not all(isinstance(k, str) and callable(v) for k, v in recurrences.items())
        ):
            raise ValueError(
                f"`recurrences` must be a dict of name -> callable probe(module, batch), got {recurrences!r}."
            )
        self.recurrences: dict[str, RecurrenceProbe] = dict(recurrences or {})
        self.pictures = check_bool("pictures", pictures)
        self.seed = check_number("seed", seed, ge=0, integer=True)
        self.forward_fn = check_forward_fn(forward_fn)
        self._compiled = False  # under torch.compile: the inputs are captured from an eager pass of their own
        self.state = HorizonState()
        self._modules: dict[str, nn.RNNBase] = {}
        self._captured: dict[str, Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._probing = False
        self._step_at_start = -1
        self._active = False
        self._warned: set[str] = set()
        self._history: list[tuple[int, list[HorizonReading]]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, recurrences=sorted(self.recurrences))

    # -- lifecycle -------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._modules = {clean_name(n): m for n, m in pl_module.named_modules() if isinstance(m, nn.RNNBase)}
        reason = None
        self._compiled = bool(compiled_modules(pl_module))
        if self._compiled and not CAN_RUN_EAGERLY:
            reason = "the model runs under torch.compile and this torch has no torch.compiler.set_stance (>= 2.6)"
        elif is_sharded(trainer):
            reason = "its parameters are sharded (FSDP/ModelParallel): the probe would run the modules outside it"
        self._active = reason is None and bool(self._modules or self.recurrences)
        if reason is not None:
            self._warn_once(reason, f"GradientsThroughTime is inactive in this run: {reason}.")
        elif not self._active:  # nothing recurrent to watch: not a fault (the example config lists every callback)
            rank_zero_info(
                "GradientsThroughTime has nothing to watch in this model (no nn.RNN, nn.LSTM or nn.GRU); a "
                "recurrence written as a loop over a cell is probed with `recurrences={name: probe}`."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._probing, self._captured = [], False, {}

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        if self._active and self._due(logger_step(trainer)) and not self._probing:
            self._probing = True  # until this step's optimizer step ends (several batches under accumulation)
            if not self._compiled:  # under torch.compile the hooks would reach the graph: captured after the step
                self._install_hooks()

    def _install_hooks(self) -> None:
        for name, module in self._modules.items():
            self._hooks.append(module.register_forward_pre_hook(self._capture(name)))

    def _capture_eagerly(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, Tensor]:
        """What each recurrent module reads on the probe rows of ``batch``, from an eager pass of their own."""
        self._install_hooks()
        try:
            run_eagerly(self.forward_fn, pl_module, first_rows(batch, self.probe_size))
            return self._captured
        finally:
            self._remove_hooks()

    def _capture(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in self._captured and args:
                self._captured[name] = _batch_first(module, args[0], self.probe_size)

        return hook

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probing and trainer.global_step > self._step_at_start:  # the probe step's optimizer step ended
            captured = self._captured
            self._remove_hooks()
            try:
                if self._compiled and self._modules:  # the cell loops of `recurrences` take the batch themselves
                    captured = self._capture_eagerly(pl_module, batch)
                with eagerly():  # a compiled recurrence (or a user's probe calling one) runs as eager code
                    self._probe(trainer, pl_module, captured, batch)
            except Exception as err:  # a model the probe cannot run: our pass, never the run's end (warned)
                self._active = False
                self._warn_once("failed", f"GradientsThroughTime could not probe this model and is now inactive: {err}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- the probe -------------------------------------------------------------------------------------------
    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: dict[str, Tensor], batch: Any
    ) -> None:
        started = time.perf_counter()
        names: list[str] = []
        profiles: list[list[Tensor]] = []  # per module: its directions' input profiles
        for name, inputs in captured.items():
            names.append(name)
            profiles.append(
                self._with_module(self._modules[name], functools.partial(self._input_profiles, inputs=inputs))
            )
        for name, probe in self.recurrences.items():
            inputs, run = probe(pl_module, first_rows(batch, self.probe_size))
            names.append(name)
            profiles.append([lag_sensitivity(run, inputs, generator=self._generator())])
        if not names:
            return
        # the probe's one transfer, the loss history riding on it
        fetched, history = fetch_with_history(
            trainer, session_of(trainer).loss_trace, *(p for per_module in profiles for p in per_module)
        )
        readings, at = [], 0
        for name, per_module in zip(names, profiles, strict=True):
            directions = fetched[at : at + len(per_module)]
            at += len(per_module)
            reading = _reading(name, directions, self.threshold, None)
            module = self._modules.get(name) if name in captured else None
            if module is not None and not module.bidirectional and reading.peak >= self.exploding_factor:
                # the input profile grows: is it the recurrence that amplifies? (T sequential steps: only then)
                state = self._with_module(module, functools.partial(self._state_profile, inputs=captured[name]))
                reading = _reading(name, directions, self.threshold, host_values(state)[0])
            readings.append(reading)
        self._report(trainer, readings, LossLevel.of(history), time.perf_counter() - started)

    @staticmethod
    def _with_module(module: nn.RNNBase, measure: Callable[[nn.RNNBase], Any]) -> Any:
        """``measure(module)`` in eval mode (no dropout between layers: the same function at every probe), its
        training flag restored, without cuDNN (whose RNN backward refuses eval mode)."""
        training = module.training
        module.eval()
        try:
            with torch.backends.cudnn.flags(enabled=False):
                return measure(module)
        finally:
            module.train(training)

    def _input_profiles(self, module: nn.RNNBase, inputs: Tensor) -> list[Tensor]:
        """Each direction's input profile (the backward direction from the first output)."""
        width = _width(module)

        def run(x: Tensor) -> Tensor:
            out = module(x if module.batch_first else x.transpose(0, 1))[0]
            return out if module.batch_first else out.transpose(0, 1)

        directions = [lag_sensitivity(run, inputs, output_slice=slice(0, width), generator=self._generator())]
        if module.bidirectional:
            backward = slice(width, 2 * width)
            directions.append(
                lag_sensitivity(run, inputs, reverse=True, output_slice=backward, generator=self._generator())
            )
        return directions

    def _state_profile(self, module: nn.RNNBase, inputs: Tensor) -> Tensor:
        """The product of the state Jacobians against the lag, the module run one timestep at a time."""

        def step(x: Tensor, state: Any) -> tuple[Tensor, Any]:
            out, state = module(x if module.batch_first else x.transpose(0, 1), state)
            return (out if module.batch_first else out.transpose(0, 1)), state

        return state_sensitivity(step, inputs, output_slice=slice(0, _width(module)), generator=self._generator())

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)  # on the CPU (drawn there, then moved): the same everywhere

    # -- judging ---------------------------------------------------------------------------------------------
    def _report(self, trainer: pl.Trainer, readings: list[HorizonReading], loss: LossLevel, seconds: float) -> None:
        step = logger_step(trainer)
        metrics: dict[str, float] = {"gradwatch/through_time/probe_seconds": seconds}
        for r in readings:
            metrics[f"gradwatch/through_time/horizon/{r.name}"] = float(r.horizon)
            if math.isfinite(r.decay):
                metrics[f"gradwatch/through_time/decay_per_step/{r.name}"] = r.decay
            self.state.readings[r.name] = {"step": step, **asdict(r), "profiles": []}
            exploding = self._judge_exploding(trainer, step, r, loss)
            short = not exploding and r.horizon < self.short_fraction * r.length
            self._judge_vanishing(trainer, step, r, loss, short)
        self._log_metrics(trainer, metrics)
        self._history = (self._history + [(step, readings)])[-4:]  # the picture overlays the last probes
        if self.pictures:
            write_profiles(trainer, self._history, step)

    def _judge_exploding(self, trainer: pl.Trainer, step: int, r: HorizonReading, loss: LossLevel) -> bool:
        exploding, finding = exploding_finding(step, r, loss, self.exploding_factor)
        kind = AlertKind.EXPLODING_THROUGH_TIME
        self._set_condition(
            trainer,
            kind,
            r.name,
            exploding,
            lambda: Alert(step, kind, r.name, r.peak, self.exploding_factor, alert_message(kind, finding)),
        )
        return exploding

    def _judge_vanishing(self, trainer: pl.Trainer, step: int, r: HorizonReading, loss: LossLevel, short: bool) -> None:
        streak = self.state.streaks.setdefault(r.name, [])
        finding = vanishing_finding(streak, step, r, loss, short, self.patience_steps, self.threshold)
        if finding is None:
            self._clear_condition(AlertKind.VANISHING_THROUGH_TIME, r.name, trainer.global_step)
            return
        kind, limit = AlertKind.VANISHING_THROUGH_TIME, self.short_fraction * r.length
        self._set_condition(
            trainer,
            kind,
            r.name,
            True,
            lambda: Alert(step, kind, r.name, float(r.horizon), limit, alert_message(kind, finding)),
        )

    # -- the report, TensorBoard and state -------------------------------------------------------------------
    @override
    def _report_lines(self, trainer: pl.Trainer) -> list[str]:
        return [
            f"memory horizon of `{name}` at step {r['step']}: {r['horizon']} of {r['length']} timesteps "
            f"(sensitivity x{r['decay']:.3g} per timestep)"
            for name, r in self.state.readings.items()
        ]

    @override
    def _report_pictures(self, trainer: pl.Trainer, directory: str) -> list[tuple[str, str]]:
        name = "gradients_through_time.png"
        if self.pictures and self._history and draw_profiles(self._history, f"{directory}/{name}"):
            return [("Gradients through time: sensitivity against the lag", name)]
        return []

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        if not self._active:
            return {}
        return {
            "gradwatch: through time": {
                "memory horizon (timesteps)": ["Multiline", [r"^gradwatch/through_time/horizon/"]],
                "sensitivity factor per timestep": ["Multiline", [r"^gradwatch/through_time/decay_per_step/"]],
                "probe time (s)": ["Multiline", [r"^gradwatch/through_time/probe_seconds$"]],
            }
        }

    @override
    def _config(self) -> dict[str, Any]:
        return {"short_fraction": self.short_fraction, "threshold": self.threshold}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"through_time": asdict(self.state)}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        saved = state.get("through_time")
        if saved is None:
            return []
        if changed:
            return ["the streaks of short horizons"]
        self.state = HorizonState(**saved)
        return []

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


def _width(module: nn.RNNBase) -> int:
    """The hidden units of one direction of a recurrent module's output."""
    return module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size


def _batch_first(module: nn.Module, inputs: Any, rows: int) -> Tensor:
    """The first ``rows`` sequences of a recurrent module's input, batch first, detached (a packed batch padded)."""
    if isinstance(inputs, PackedSequence):
        inputs, _ = pad_packed_sequence(inputs, batch_first=bool(getattr(module, "batch_first", False)))
    if not isinstance(inputs, Tensor):
        raise TypeError(f"the input of a recurrent module is a {type(inputs).__name__}, not a tensor")
    if inputs.dim() == 2:  # an unbatched sequence (time, features)
        return inputs.detach()[None].clone()
    x = inputs if getattr(module, "batch_first", False) else inputs.transpose(0, 1)
    return x[:rows].detach().clone()


def _reading(name: str, directions: list[list[float]], threshold: float, state: list[float] | None) -> HorizonReading:
    profiles = [torch.tensor(p) for p in directions]
    horizons = [memory_horizon(p, threshold) for p in profiles]
    shortest = min(range(len(profiles)), key=lambda i: horizons[i])
    # what amplifies: the state Jacobians' product where it was measured, else the input profile
    tails = [torch.tensor(state)[1:]] if state is not None else [p[1:] for p in profiles if p.numel() > 1]
    peaks = [(float(t.nan_to_num(nan=math.inf).max()), int(t.nan_to_num(nan=math.inf).argmax()) + 1) for t in tails]
    peak, peak_lag = max(peaks, default=(0.0, 0))
    return HorizonReading(
        name=name,
        length=int(profiles[0].numel()),
        horizon=horizons[shortest],
        decay=decay_per_step(profiles[shortest]),
        peak=peak,
        peak_lag=peak_lag,
        peak_of_state=state is not None,
        profiles=[list(p) for p in directions],
    )
