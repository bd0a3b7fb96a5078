"""GradientNormLogger: per-layer gradient norms, gradient-to-weight ratios and vanishing/exploding alerts."""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._base import GradwatchCallback
from lightning_gradwatch._layout import exact_tags, layer_charts
from lightning_gradwatch._params import ParamGroups, group_of, optimizer_index
from lightning_gradwatch._reporting import host_values, logger_step, tensorboard_writers
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch._types import GreaterThanOne, PositiveFloat, PositiveInt
from lightning_gradwatch._validation import check_bool, check_choice, check_number
from lightning_gradwatch.alerts import Alert, AlertKind, with_remedy
from lightning_gradwatch.functional.norms import power_means, total_norm, validate_norm_type


class GradientNormLogger(GradwatchCallback):
    r"""Log the global and per-layer gradient norms and gradient-to-weight ratios; alert on vanishing or
    exploding gradients.

    Norms are of the real, unscaled gradients under every precision (16-mixed with a GradScaler, fused
    optimizers included; bf16; 32), taken in ``on_before_optimizer_step``: after gradient accumulation and
    the DDP all-reduce, before any clipping by other callbacks or the Trainer. On steps that do not log
    nothing is computed; on logging steps the norms are computed on device with ``foreach`` kernels and
    brought to the host in one transfer. Under FSDP the norms of the local shards are all-reduced so the
    logged values are those of the full parameters.

    Logged metrics (to every Lightning logger; TensorBoard also gets a grouped custom-scalars layout):

    - ``gradwatch/global/grad_norm``: the norm of all gradients (``..._optimizer{i}`` with several optimizers).
    - ``gradwatch/grad_norm/{layer}``: the norm of each layer's gradients.
    - ``gradwatch/grad_to_weight/{layer}``: ``||grad|| / ||weight||`` of each layer.
    - ``gradwatch/grad_hist/{layer}``: gradient histograms (TensorBoard only), if enabled.

    Alerts (see :class:`~lightning_gradwatch.Alert`):

    - ``vanishing_gradient``: in the first half of the network, a layer's gradient magnitude per element
      (``norm / numel^(1/p)``, the RMS for ``p=2``) is below ``vanishing_threshold`` and below
      ``vanishing_ratio`` times the median over all layers. Names the earliest such layer.
    - ``exploding_gradient``: the global norm is above ``exploding_threshold``, or above ``exploding_factor``
      times the median of its own recent history. Names the layer with the largest norm.

    Checks run on logging steps. Steps the GradScaler skips for overflow are neither logged nor checked, and
    non-finite norms never enter the history (they are :class:`~lightning_gradwatch.NaNGuard`'s business).

    Args:
        norm_type: the ``p`` of the p-norm: a number >= 1, or ``"inf"`` for the max-abs norm.
        group_by: ``"module"`` to report one norm per module (its weight and bias together), or
            ``"parameter"`` for one per parameter.
        log_every_n_steps: log every this many optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps``.
        log_grad_to_weight: also log each layer's gradient-to-weight norm ratio.
        histogram_every_n_steps: write per-layer gradient histograms to TensorBoard every this many steps
            (each costs a host copy of the gradients); ``None`` disables them.
        vanishing_threshold: per-element gradient magnitude below which an early layer may be vanishing;
            ``None`` disables the vanishing alert.
        vanishing_ratio: ...and the fraction of the network's median per-element magnitude below which it is.
        exploding_threshold: global gradient norm above which gradients are exploding; ``None`` disables the
            absolute rule.
        exploding_factor: a global norm this many times the median of the last ``history_size`` logged
            norms is an explosion; ``None`` disables the relative rule.
        history_size: how many logged global norms the relative rule remembers (it starts once 5 are known).

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientNormLogger

        trainer = Trainer(callbacks=[GradientNormLogger()], log_every_n_steps=25)
    """

    hook_order = 10

    def __init__(
        self,
        norm_type: float | Literal["inf"] = 2.0,
        group_by: Literal["module", "parameter"] = "module",
        log_every_n_steps: PositiveInt | None = None,
        log_grad_to_weight: bool = True,
        histogram_every_n_steps: PositiveInt | None = None,
        vanishing_threshold: PositiveFloat | None = 1e-7,
        vanishing_ratio: PositiveFloat = 1e-3,
        exploding_threshold: PositiveFloat | None = 1e3,
        exploding_factor: GreaterThanOne | None = 10.0,
        history_size: PositiveInt = 20,
    ) -> None:
        super().__init__()
        self.norm_type = validate_norm_type(norm_type)
        self.group_by = check_choice("group_by", group_by, ("module", "parameter"))
        positive_int: dict[str, Any] = {"ge": 1, "integer": True, "optional": True}
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, **positive_int)
        self.log_grad_to_weight = check_bool("log_grad_to_weight", log_grad_to_weight)
        self.histogram_every_n_steps = check_number("histogram_every_n_steps", histogram_every_n_steps, **positive_int)
        self.vanishing_threshold = check_number("vanishing_threshold", vanishing_threshold, gt=0, optional=True)
        self.vanishing_ratio = check_number("vanishing_ratio", vanishing_ratio, gt=0)
        self.exploding_threshold = check_number("exploding_threshold", exploding_threshold, gt=0, optional=True)
        self.exploding_factor = check_number("exploding_factor", exploding_factor, gt=1, optional=True)
        self.history_size = check_number("history_size", history_size, ge=5, integer=True)
        self._history: dict[str, list[float]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            norm_type=self.norm_type, group_by=self.group_by, log_every_n_steps=self.log_every_n_steps
        )

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if not step.grads or step.repeat:
            return  # the guard dropped this update, or a closure optimizer re-evaluates a step already logged
        log_now = self._should_log(trainer, self.log_every_n_steps)
        hist_now = (
            self.histogram_every_n_steps is not None and (logger_step(trainer) + 1) % self.histogram_every_n_steps == 0
        )
        if not (log_now or hist_now):
            return
        groups = step.index.grouping(self.group_by)
        if hist_now:
            self._write_histograms(trainer, groups, step)
        if log_now:
            self._log_norms(trainer, groups, step)

    # -- internals -------------------------------------------------------------------------------------------
    def _log_norms(self, trainer: pl.Trainer, groups: ParamGroups, step: StepGradients) -> None:
        layer_norms = groups.combine(step.param_norms(self.norm_type), self.norm_type)  # the shared pass
        global_norm = total_norm(layer_norms, self.norm_type)
        to_fetch = [global_norm, layer_norms]
        if self.log_grad_to_weight:
            weight_norms = groups.combine(step.weight_norms(self.norm_type), self.norm_type)
            to_fetch.append(layer_norms / weight_norms.clamp_min(1e-12))
        to_fetch.append(self._overflow_flag(step, global_norm))

        fetched = host_values(*to_fetch)  # the one host sync of a logging step
        if fetched[-1][0] > 0:
            return  # the GradScaler skips this step for overflow: normal under fp16, nothing to report
        total, per_layer = fetched[0][0], fetched[1]
        suffix = self._optimizer_suffix(trainer, step.optimizer)
        metrics = {f"gradwatch/global/grad_norm{suffix}": total}
        present_groups = sorted({groups.group_of_param[i] for i in step.positions})
        for g in present_groups:
            metrics[f"gradwatch/grad_norm/{groups.group_names[g]}"] = per_layer[g]
        if self.log_grad_to_weight:
            ratios = fetched[2]
            for g in present_groups:
                metrics[f"gradwatch/grad_to_weight/{groups.group_names[g]}"] = ratios[g]
        self._log_metrics(trainer, metrics)
        self._check(trainer, groups, present_groups, total, per_layer, suffix)

    @staticmethod
    def _overflow_flag(step: StepGradients, global_norm: Tensor) -> Tensor:
        """1.0 on a step the GradScaler will skip for overflow, else 0.0 (a device tensor, no sync)."""
        if step.found_inf is not None:
            return step.found_inf.to(global_norm.device)
        if step.has_scaler:
            # fused optimizers check for inf inside their own step: non-finite scaled grads mean a skip there too
            return (~torch.isfinite(global_norm)).to(torch.float32)
        return torch.zeros((), device=global_norm.device)

    @staticmethod
    def _optimizer_suffix(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
        if len(trainer.optimizers) <= 1:
            return ""
        return f"_optimizer{optimizer_index(trainer, optimizer)}"

    def _check(
        self,
        trainer: pl.Trainer,
        groups: ParamGroups,
        present: list[int],
        total: float,
        per_layer: list[float],
        suffix: str,
    ) -> None:
        step = trainer.global_step
        p = "inf" if math.isinf(self.norm_type) else f"{self.norm_type:g}"
        if not math.isfinite(total):
            return  # non-finite gradients: NaNGuard's business; never folded into the history
        history = self._history.setdefault(suffix, [])
        median = statistics.median(history) if len(history) >= 5 else None
        reason = None
        if self.exploding_threshold is not None and total > self.exploding_threshold:
            reason = f"is above the threshold {self.exploding_threshold:g}"
            threshold = self.exploding_threshold
        elif self.exploding_factor is not None and median is not None and total > self.exploding_factor * median:
            reason = f"jumped to {total / median:.3g}x its recent median {median:.3g}"
            threshold = self.exploding_factor * median
        largest = max(present, key=lambda g: per_layer[g])
        largest_name = groups.group_names[largest]
        self._set_condition(
            trainer,
            AlertKind.EXPLODING_GRADIENT,
            suffix,
            reason is not None,
            lambda: Alert(
                step=step,
                kind=AlertKind.EXPLODING_GRADIENT,
                name=largest_name,
                value=total,
                threshold=threshold,
                message=with_remedy(
                    AlertKind.EXPLODING_GRADIENT,
                    f"Exploding gradients at step {step}: the global {p}-norm {total:.4g} {reason}; the largest "
                    f"layer norm is in '{largest_name}' ({per_layer[largest]:.4g}).",
                ),
            ),
        )
        history.append(total)
        del history[: -self.history_size]
        if self.vanishing_threshold is not None:
            self._check_vanishing(trainer, groups, present, per_layer, suffix, step)

    def _check_vanishing(
        self,
        trainer: pl.Trainer,
        groups: ParamGroups,
        present: list[int],
        per_layer: list[float],
        suffix: str,
        step: int,
    ) -> None:
        nonzero = [g for g in present if per_layer[g] > 0 and math.isfinite(per_layer[g])]
        if len(nonzero) < 2:
            return
        magnitude = power_means(
            torch.tensor([per_layer[g] for g in nonzero], dtype=torch.float64),
            groups.group_numels[nonzero],
            self.norm_type,
        ).tolist()
        median = statistics.median(magnitude)
        early = nonzero[: math.ceil(len(nonzero) / 2)]
        assert self.vanishing_threshold is not None
        offending = [
            (g, m)
            for g, m in zip(early, magnitude, strict=False)  # early is a prefix of the layers
            if m < self.vanishing_threshold and m < self.vanishing_ratio * median
        ]
        first_name = groups.group_names[offending[0][0]] if offending else ""
        first_value = offending[0][1] if offending else 0.0
        self._set_condition(
            trainer,
            AlertKind.VANISHING_GRADIENT,
            suffix,
            bool(offending),
            lambda: Alert(
                step=step,
                kind=AlertKind.VANISHING_GRADIENT,
                name=first_name,
                value=first_value,
                threshold=float(self.vanishing_threshold),  # type: ignore[arg-type]
                message=with_remedy(
                    AlertKind.VANISHING_GRADIENT,
                    f"Vanishing gradients at step {step}: layer '{first_name}' has a gradient magnitude of "
                    f"{first_value:.3g} per element, {first_value / median:.2g}x the network's median "
                    f"({median:.3g}); {len(offending)} of the first {len(early)} layers are affected.",
                ),
            ),
        )

    def _write_histograms(self, trainer: pl.Trainer, groups: ParamGroups, step: StepGradients) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        by_group: dict[int, list[Tensor]] = {}
        for g, i in zip(step.grads, step.positions, strict=True):
            by_group.setdefault(groups.group_of_param[i], []).append(g.detach().reshape(-1).float())
        logged_step = logger_step(trainer)
        for g, parts in by_group.items():
            values = torch.cat(parts)
            if step.unscale is not None:
                values = values * step.unscale.to(values.device)
            values = values[torch.isfinite(values)].cpu()
            if values.numel():
                for writer in writers:
                    writer.add_histogram(f"gradwatch/grad_hist/{groups.group_names[g]}", values, logged_step)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        layers = [group_of(n, self.group_by) for n, p in pl_module.named_parameters() if p.requires_grad]
        charts: dict[str, list[Any]] = {"global gradient norm": ["Multiline", [r"^gradwatch/global/grad_norm"]]}
        metrics = [("grad_norm", "gradient norm")]
        if self.log_grad_to_weight:
            metrics.append(("grad_to_weight", "grad/weight ratio"))
        for tag, title in metrics:
            for span, names in layer_charts(list(dict.fromkeys(layers))):
                charts[f"{title}: {span}"] = ["Multiline", [exact_tags(f"gradwatch/{tag}/", names)]]
        return {"gradwatch: gradients": charts}

    # -- state -----------------------------------------------------------------------------------------------
    @override
    def _config(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type}

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"norm_history": {k: list(v) for k, v in self._history.items()}}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        if "norm_type" in changed:  # norms of another p are not comparable: the relative rule starts afresh
            self._history = {}
            return ["the global-norm history of the relative exploding rule"] if state.get("norm_history") else []
        self._history = {str(k): [float(x) for x in v] for k, v in state.get("norm_history", {}).items()}
        return []
