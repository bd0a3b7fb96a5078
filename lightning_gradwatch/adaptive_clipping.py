"""AdaptiveClipping: gradient clipping at a threshold learned from the run's own gradient-norm history."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._core import (
    GradwatchCallback,
    ParamGroups,
    all_reduce_norms,
    check_fraction,
    check_positive,
    check_positive_int,
    grad_unscale_factor,
    host_values,
    is_sharded,
    local_tensor,
    optimizer_index,
    scaler_found_inf,
)
from lightning_gradwatch.alerts import Alert, AlertKind
from lightning_gradwatch.functional.clipping import (
    agc_coefficients,
    apply_clip_coefficient,
    clip_coefficient,
    ema_update,
    ring_push,
    ring_quantile,
    zscore_threshold,
)
from lightning_gradwatch.functional.norms import global_norm, validate_norm_type

_MODES = ("zscore", "percentile", "agc")
# the statistics that survive a checkpoint; the others only cover the current logging interval
_PERSISTENT = ("mean", "var", "count", "history", "history_count", "total_clipped", "total_steps")


class AdaptiveClipping(GradwatchCallback):
    r"""Clip gradients to a threshold learned from the run's own gradient-norm history; report spikes.

    Three rules (``mode``):

    - ``"zscore"`` (default, in the spirit of ZClip, 2025): an exponential moving average of the mean and
      variance of the global gradient norm. A norm above ``mean + z_threshold * std`` is clipped, and the
      farther out it is the closer to the mean it is brought (``mean + z_threshold * std * z_threshold / z``):
      an outlier batch leaves the hook at the size of an ordinary step. The statistics are fed the clipped
      norm, so a spike cannot inflate the variance and switch clipping off afterwards.
    - ``"percentile"`` (in the spirit of AutoClip, 2020): the threshold is the ``quantile`` of the last
      ``history_size`` global norms, kept in a ring buffer on the device. The history takes the raw norms
      (one spike moves a quantile by one rank only; clipped values would ratchet the threshold down).
    - ``"agc"`` (Adaptive Gradient Clipping, NFNets 2021): each output unit (row) of every weight of 2 or more
      dimensions is clipped so that ``||G_unit|| <= clip_factor * max(||W_unit||, agc_eps)``. 1-D parameters
      (biases, norm gains: a zero-initialised bias would never move) and the output layer are left alone, as
      in the paper (see ``agc_exclude``); the z-score rule stays on as a backstop, since a spike through
      those parameters alone can still wreck a run.

    Clipping happens in ``on_before_optimizer_step``: after gradient accumulation and the DDP all-reduce, on
    the real (unscaled) gradients under every precision, in automatic and manual optimization alike. Every
    decision is computed on the device and applied with ``foreach`` kernels, like ``clip_grad_norm_``: no
    host sync per step; one transfer on logging steps. Under DDP the gradients are identical on every rank,
    so every rank takes the same decision without a collective; under FSDP the global norm is all-reduced
    across shards (the one collective, inherent to any global-norm clipping).

    During the first ``warmup_steps`` steps the statistics are gathered and only norms above ``warmup_cap``
    times their running mean are clipped (a safety cap against a spike before the statistics are ready).
    Steps the GradScaler skips for overflow under 16-mixed, and any non-finite norm under bf16/32 (which is
    :class:`~lightning_gradwatch.NaNGuard`'s business), are neither clipped nor folded into the statistics.

    Logged metrics (on logging steps; ``_optimizer{i}`` appended with several optimizers):

    - ``gradwatch/clip/pre_clip_norm``: the global gradient norm before clipping.
    - ``gradwatch/clip/threshold``: the global norm the gradients are clipped to if above it (in ``"agc"``
      mode, the z-score backstop's).
    - ``gradwatch/clip/coefficient``: the factor applied (the smallest unit factor in ``"agc"`` mode).
    - ``gradwatch/clip/clipped_fraction``: the fraction of steps clipped since the previous logging step.
    - ``gradwatch/clip/ema_mean``, ``gradwatch/clip/ema_std``: the norm statistics.
    - ``gradwatch/clip/spikes``: the number of spikes since the previous logging step.

    Alerts: ``gradient_spike`` when, since the previous logging step, a step's pre-clip norm reached
    ``alert_ratio`` times ``mean + z_threshold * std`` (in every mode); at most one alert per logging
    interval, naming the worst spike and how many there were.

    Args:
        mode: ``"zscore"``, ``"percentile"`` or ``"agc"``.
        z_threshold: in ``"zscore"`` mode, how many standard deviations above the mean a norm may be; in every
            mode, the base of spike detection.
        ema_decay: the decay of the moving mean and variance (``1 / (1 - ema_decay)`` steps of memory).
        quantile: in ``"percentile"`` mode, the quantile of the history to clip to.
        history_size: in ``"percentile"`` mode, how many past norms the quantile is taken over.
        clip_factor: in ``"agc"`` mode, the largest allowed ratio of a unit's gradient norm to its weight norm.
        agc_eps: in ``"agc"`` mode, the floor of a unit's weight norm.
        agc_exclude: in ``"agc"`` mode, ``fnmatch`` patterns of parameter names left unclipped; ``None``
            excludes the last parameter of 2 or more dimensions in model order (normally the output layer),
            ``[]`` excludes nothing.
        warmup_steps: how many finite norms to gather before adaptive clipping starts.
        warmup_cap: during warm-up, clip norms above this many times the running mean; ``None``: no clipping
            during warm-up.
        norm_type: the ``p`` of the global p-norm: a number >= 1, or ``"inf"``.
        alert_ratio: a pre-clip norm at least this many times ``mean + z_threshold * std`` is a spike.
        log_every_n_steps: log and check for spikes every this many optimizer steps; ``None`` follows the
            Trainer's ``log_every_n_steps``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import AdaptiveClipping

        trainer = Trainer(callbacks=[AdaptiveClipping()])  # z-score clipping with safe defaults
    """

    hook_order = 30

    def __init__(
        self,
        mode: Literal["zscore", "percentile", "agc"] = "zscore",
        z_threshold: float = 3.0,
        ema_decay: float = 0.97,
        quantile: float = 0.9,
        history_size: int = 1000,
        clip_factor: float = 0.1,
        agc_eps: float = 1e-3,
        agc_exclude: Sequence[str] | None = None,
        warmup_steps: int = 25,
        warmup_cap: float | None = 10.0,
        norm_type: float | Literal["inf"] = 2.0,
        alert_ratio: float = 5.0,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {', '.join(repr(m) for m in _MODES)}, got {mode!r}.")
        check_positive("z_threshold", z_threshold)
        if not (isinstance(ema_decay, (int, float)) and not isinstance(ema_decay, bool) and 0 < ema_decay < 1):
            raise ValueError(f"`ema_decay` must be a number with 0 < ema_decay < 1, got {ema_decay!r}.")
        check_fraction("quantile", quantile)
        check_positive_int("history_size", history_size)
        check_positive("clip_factor", clip_factor)
        check_positive("agc_eps", agc_eps)
        if agc_exclude is not None and (
            isinstance(agc_exclude, str) or not all(isinstance(p, str) for p in agc_exclude)
        ):
            raise ValueError(f"`agc_exclude` must be a list of name patterns or None, got {agc_exclude!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be an integer >= 1, got {warmup_steps!r}.")
        if warmup_cap is not None and not (
            isinstance(warmup_cap, (int, float)) and not isinstance(warmup_cap, bool) and warmup_cap > 1
        ):
            raise ValueError(f"`warmup_cap` must be a number > 1 or None, got {warmup_cap!r}.")
        self.norm_type = validate_norm_type(norm_type)
        if not (isinstance(alert_ratio, (int, float)) and not isinstance(alert_ratio, bool) and alert_ratio >= 1):
            raise ValueError(f"`alert_ratio` must be a number >= 1, got {alert_ratio!r}.")
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.mode = mode
        self.z_threshold = float(z_threshold)
        self.ema_decay = float(ema_decay)
        self.quantile = float(quantile)
        self.history_size = history_size
        self.clip_factor = float(clip_factor)
        self.agc_eps = float(agc_eps)
        self.agc_exclude = None if agc_exclude is None else list(agc_exclude)
        self.warmup_steps = warmup_steps
        self.warmup_cap = None if warmup_cap is None else float(warmup_cap)
        self.alert_ratio = float(alert_ratio)
        self.log_every_n_steps = log_every_n_steps
        self._state: dict[int, dict[str, Tensor]] = {}
        self._loaded: dict[int, dict[str, Tensor]] = {}
        self._steps_since_log: dict[int, int] = {}
        self._params: dict[int, tuple[list[torch.nn.Parameter], list[bool]]] = {}
        self._warned_trainer_clipping = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.mode == "agc" and is_sharded(trainer):
            raise ValueError(
                "`mode`='agc' needs whole weight rows on each rank and is not supported with sharded strategies "
                "(FSDP, ModelParallelStrategy); use mode='zscore' or 'percentile'."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params.clear()
        self._steps_since_log.clear()
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val > 0 and not self._warned_trainer_clipping:
            self._warned_trainer_clipping = True
            rank_zero_warn(
                f"AdaptiveClipping is used together with Trainer(gradient_clip_val={clip_val}): both clip, "
                "the Trainer after AdaptiveClipping, so the tighter limit wins on each step. Remove "
                "`gradient_clip_val` to let AdaptiveClipping decide alone."
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def _before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        params, agc_mask = self._optimizer_params(index, pl_module, optimizer)
        present = [(p, m) for p, m in zip(params, agc_mask, strict=True) if p.grad is not None]
        if not present:
            return
        grads = [local_tensor(p.grad) for p, _ in present]  # type: ignore[arg-type]
        device = grads[0].device
        state = self._state_for(index, device)

        unscale = grad_unscale_factor(trainer, optimizer)  # fused optimizers under fp16: grads still scaled
        norm = global_norm(grads, self.norm_type)
        if is_sharded(trainer):
            norm = all_reduce_norms(norm.reshape(1), self.norm_type)[0]
        if unscale is not None:
            norm = norm * unscale.to(device)
        valid = torch.isfinite(norm)
        found_inf = scaler_found_inf(trainer, optimizer)
        if found_inf is not None:
            valid = valid & (found_inf.to(device) == 0)

        # the z-score rule's threshold (or the warm-up cap): what the statistics are fed at most, and the
        # reference for spike detection in every mode
        stats_threshold = zscore_threshold(
            state["mean"], state["var"], state["count"], self.z_threshold, self.warmup_steps, self.warmup_cap
        )
        if self.mode == "percentile":
            quantile = ring_quantile(state["history"], state["history_count"], self.quantile)
            threshold = torch.where(state["history_count"] >= self.warmup_steps, quantile, stats_threshold)
        else:  # zscore; in agc mode the z-score rule is the backstop for the parameters AGC leaves alone
            threshold = zscore_threshold(
                state["mean"],
                state["var"],
                state["count"],
                self.z_threshold,
                self.warmup_steps,
                self.warmup_cap,
                norm=norm,
            )
        unit_coefficient = self._apply_agc(present, grads, unscale, valid) if self.mode == "agc" else None
        coefficient = torch.where(valid, clip_coefficient(norm, threshold), torch.ones_like(norm))
        apply_clip_coefficient(grads, coefficient)
        if unit_coefficient is not None:
            coefficient = coefficient * unit_coefficient  # what the most clipped unit got, for the logs

        self._update_state(state, norm, valid, stats_threshold, threshold, coefficient, trainer.global_step)
        self._steps_since_log[index] = self._steps_since_log.get(index, 0) + 1
        if self._should_log(trainer, self.log_every_n_steps):
            self._report(trainer, index, state)

    # -- internals -------------------------------------------------------------------------------------------
    def _optimizer_params(
        self, index: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> tuple[list[torch.nn.Parameter], list[bool]]:
        """The optimizer's parameters (model order first) and, for AGC, whether each one is clipped unit-wise."""
        if index not in self._params:
            groups = ParamGroups.build(pl_module, optimizer, "parameter")
            params, names = list(groups.params), list(groups.names)
            known = {id(p) for p in params}
            for group in optimizer.param_groups:  # parameters not registered on the module
                for p in group["params"]:
                    if id(p) not in known:
                        params.append(p)
                        names.append("")
                        known.add(id(p))
            self._params[index] = (params, self._agc_mask(params, names))
        return self._params[index]

    def _agc_mask(self, params: list[torch.nn.Parameter], names: list[str]) -> list[bool]:
        multi = [p.dim() >= 2 for p in params]
        if self.agc_exclude is None:
            last = max((i for i, m in enumerate(multi) if m), default=None)
            return [m and i != last for i, m in enumerate(multi)]
        patterns = self.agc_exclude
        return [
            m and not any(fnmatch.fnmatchcase(n, pat) for pat in patterns) for m, n in zip(multi, names, strict=True)
        ]

    def _state_for(self, index: int, device: torch.device) -> dict[str, Tensor]:
        state = self._state.get(index)
        if state is None:

            def zero(dtype: torch.dtype = torch.float32) -> Tensor:
                return torch.zeros((), dtype=dtype, device=device)

            state = {
                "mean": zero(),
                "var": zero(),
                "count": zero(),
                "history": torch.zeros(self.history_size if self.mode == "percentile" else 1, device=device),
                "history_count": zero(torch.int64),
                "total_clipped": zero(),
                "total_steps": zero(),
            }
            loaded = self._loaded.pop(index, None)
            if loaded is not None:
                for key in _PERSISTENT:
                    if key in loaded and loaded[key].shape == state[key].shape:
                        state[key] = loaded[key].to(device=device, dtype=state[key].dtype)
            state.update(self._fresh_interval(device))
            self._state[index] = state
        elif state["mean"].device != device:
            for key in state:
                state[key] = state[key].to(device)
        return state

    @staticmethod
    def _fresh_interval(device: torch.device) -> dict[str, Tensor]:
        keys = ("clipped", "spikes", "worst_ratio", "worst_step", "worst_norm", "worst_threshold", "worst_coef")
        return {k: torch.zeros((), device=device) for k in keys}

    def _apply_agc(
        self,
        present: list[tuple[torch.nn.Parameter, bool]],
        grads: list[Tensor],
        unscale: Tensor | None,
        valid: Tensor,
    ) -> Tensor:
        chosen = [i for i, (_, clip) in enumerate(present) if clip]
        if not chosen:
            return torch.ones((), device=grads[0].device)
        weights = [local_tensor(present[i][0]) for i in chosen]
        clipped_grads = [grads[i] for i in chosen]
        coefficients, max_ratio, _ = agc_coefficients(
            weights, clipped_grads, self.clip_factor, self.agc_eps, grad_scale=unscale
        )
        for g, c in zip(clipped_grads, coefficients, strict=True):
            g.mul_(torch.where(valid, c, torch.ones_like(c)))
        smallest = torch.where(torch.isfinite(max_ratio), max_ratio.clamp_min(1.0).reciprocal(), 1.0)
        return torch.where(valid, smallest, torch.ones_like(smallest))

    def _update_state(
        self,
        state: dict[str, Tensor],
        norm: Tensor,
        valid: Tensor,
        stats_threshold: Tensor,
        threshold: Tensor,
        coefficient: Tensor,
        step: int,
    ) -> None:
        folded = torch.minimum(norm, stats_threshold)
        state["mean"], state["var"], state["count"] = ema_update(
            state["mean"], state["var"], state["count"], folded, self.ema_decay, valid
        )
        if self.mode == "percentile":
            state["history"], state["history_count"] = ring_push(state["history"], state["history_count"], norm, valid)
        clipped = (valid & (coefficient < 1.0)).float()
        state["clipped"] = state["clipped"] + clipped
        state["total_clipped"] = state["total_clipped"] + clipped
        state["total_steps"] = state["total_steps"] + valid.float()
        ratio = torch.where(valid, norm / stats_threshold, torch.zeros_like(norm))
        spike = ratio >= self.alert_ratio
        state["spikes"] = state["spikes"] + spike.float()
        worse = spike & (ratio > state["worst_ratio"])
        state["worst_ratio"] = torch.where(worse, ratio, state["worst_ratio"])
        state["worst_step"] = torch.where(worse, float(step), state["worst_step"])
        state["worst_norm"] = torch.where(worse, norm, state["worst_norm"])
        state["worst_threshold"] = torch.where(
            worse, torch.minimum(threshold, stats_threshold), state["worst_threshold"]
        )
        state["worst_coef"] = torch.where(worse, coefficient, state["worst_coef"])
        state["last_norm"] = norm
        state["last_threshold"] = threshold
        state["last_coefficient"] = coefficient

    def _report(self, trainer: pl.Trainer, index: int, state: dict[str, Tensor]) -> None:
        """The one host transfer of a logging step: metrics, and at most one spike alert for the interval."""
        keys = ("last_norm", "last_threshold", "last_coefficient", "clipped", "mean", "var", "spikes")
        keys += ("worst_ratio", "worst_step", "worst_norm", "worst_threshold", "worst_coef")
        values = dict(zip(keys, (v[0] for v in host_values(*(state[k] for k in keys))), strict=True))
        steps = max(self._steps_since_log.get(index, 1), 1)
        self._steps_since_log[index] = 0
        state.update(self._fresh_interval(state["mean"].device))

        suffix = f"_optimizer{index}" if len(trainer.optimizers) > 1 else ""
        metrics = {
            f"gradwatch/clip/pre_clip_norm{suffix}": values["last_norm"],
            f"gradwatch/clip/coefficient{suffix}": values["last_coefficient"],
            f"gradwatch/clip/clipped_fraction{suffix}": values["clipped"] / steps,
            f"gradwatch/clip/ema_mean{suffix}": values["mean"],
            f"gradwatch/clip/ema_std{suffix}": math.sqrt(max(values["var"], 0.0)),
            f"gradwatch/clip/spikes{suffix}": values["spikes"],
            f"gradwatch/clip/threshold{suffix}": values["last_threshold"],
        }
        self._log_metrics(trainer, {k: v for k, v in metrics.items() if math.isfinite(v)})

        count = int(values["spikes"])
        if count == 0:
            return
        step = int(values["worst_step"])
        norm, limit, ratio, coef = (values[k] for k in ("worst_norm", "worst_threshold", "worst_ratio", "worst_coef"))
        what = "scaled by" if self.mode != "agc" else "smallest unit factor"
        self._emit_alert(
            trainer,
            Alert(
                step=step,
                kind=AlertKind.GRADIENT_SPIKE,
                name=f"optimizer{index}" if suffix else "",
                value=norm,
                threshold=limit,
                message=(
                    f"{count} gradient spike{'s' if count > 1 else ''} in the last {steps} steps; the worst at step "
                    f"{step}: global norm {norm:.4g}, {ratio:.3g}x the expected ceiling, clipped ({what} {coef:.3g}). "
                    "Isolated spikes are usually bad batches (outliers, label noise); frequent ones suggest a "
                    "learning rate that is too high or missing warm-up."
                ),
            ),
        )

    # -- TensorBoard / state ---------------------------------------------------------------------------------
    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        return {
            "gradwatch: clipping": {
                "norm vs threshold": [
                    "Multiline",
                    [r"^gradwatch/clip/pre_clip_norm", r"^gradwatch/clip/threshold", r"^gradwatch/clip/ema_"],
                ],
                "clip coefficient": ["Multiline", [r"^gradwatch/clip/coefficient"]],
                "clipped fraction and spikes": [
                    "Multiline",
                    [r"^gradwatch/clip/clipped_fraction", r"^gradwatch/clip/spikes"],
                ],
            }
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        saved: dict[int, dict[str, Tensor]] = {**self._loaded}
        for index, state in self._state.items():
            saved[index] = {k: state[k].detach().cpu().clone() for k in _PERSISTENT}
        return {"clip_mode": self.mode, "clip_state": {str(i): s for i, s in saved.items()}}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._state.clear()
        self._loaded = {int(i): dict(s) for i, s in state.get("clip_state", {}).items()}
