"""What GradientNormLogger draws: the series its per-layer charts hold, their histograms, its custom-scalars layout,
and the gradient-flow picture (with a failed run's last steps written out as evidence)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_gradwatch._charts import ChartPlan, charted, plan_charts
from lightning_gradwatch._gradient_flow import GradientFlow, matplotlib_pyplot
from lightning_gradwatch._layout import exact_tags, layer_charts
from lightning_gradwatch._params import ParamGroups, group_of
from lightning_gradwatch._reporting import logger_step, tensorboard_writers
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.geometry._probe import find_blocks
from lightning_gradwatch.gradients._norm_ring import NormRing, write_recent


class NormCharts:
    """The per-layer series of the gradient charts: one per layer, or one per repeated block past ``max_series``.

    Args:
        norm_type: the norm the series combine with.
        group_by: ``"module"``, ``"parameter"`` or ``"block"``.
        layers: ``fnmatch`` patterns of the layers charted (``None``: all).
        max_series: past this many layers per metric, one series per repeated block.
    """

    def __init__(self, norm_type: float, group_by: str, layers: list[str] | None, max_series: int | None) -> None:
        self.norm_type, self.group_by, self.layers, self.max_series = norm_type, group_by, layers, max_series
        self._blocks: list[str] = []  # the model's repeated blocks, found at fit start
        self._plans: dict[tuple[str, ...], ChartPlan] = {}
        self._noted = False

    def start(self, pl_module: nn.Module) -> None:
        """A new fit: find the model's repeated blocks; plan afresh."""
        self._plans.clear()
        blocks = find_blocks(pl_module)
        self._blocks = blocks.names if blocks is not None else []

    def plan(self, layers: list[str]) -> ChartPlan:
        """Which series the layers are charted as, made once per layer list; the first time it groups on its own,
        it says so."""
        key = tuple(layers)
        plan = self._plans.get(key)
        if plan is None:
            plan, note = plan_charts(layers, self.layers, self.group_by, self._blocks, self.max_series)
            self._plans[key] = plan
            if note is not None and not self._noted:
                self._noted = True
                rank_zero_info(f"GradientNormLogger: {note}")
        return plan

    def series_metrics(
        self,
        plan: ChartPlan,
        present: list[int],
        per_layer: list[float],
        zeros: list[float],
        numels: list[float],
        extra: dict[str, list[float]],
    ) -> dict[str, float]:
        """The per-layer metrics of a logging step, as the plan charts them (exact values for single layers)."""
        present_set = set(present)
        weights = extra.pop("weight_norm", None)
        metrics: dict[str, float] = {}
        for name, members in zip(plan.names, plan.members, strict=True):
            m = [g for g in members if g in present_set]
            if not m:
                continue
            if len(m) == 1:
                g = m[0]
                metrics[f"gradwatch/grad_norm/{name}"] = per_layer[g]
                metrics[f"gradwatch/zero_fraction/{name}"] = zeros[g]
                for key, values in extra.items():
                    metrics[f"gradwatch/{key}/{name}"] = values[g]
                continue
            one = ChartPlan([name], [m], True)
            metrics[f"gradwatch/grad_norm/{name}"] = one.norms(per_layer, self.norm_type)[0]
            metrics[f"gradwatch/zero_fraction/{name}"] = one.weighted(zeros, numels)[0]
            if weights is not None and "grad_to_weight" in extra:
                metrics[f"gradwatch/grad_to_weight/{name}"] = one.ratios(per_layer, weights, self.norm_type)[0]
            if weights is not None and "update_to_weight" in extra:  # the block's ||delta w|| over its ||w||
                updates = [r * w for r, w in zip(extra["update_to_weight"], weights, strict=True)]
                metrics[f"gradwatch/update_to_weight/{name}"] = one.ratios(updates, weights, self.norm_type)[0]
        return metrics

    def write_histograms(self, trainer: pl.Trainer, groups: ParamGroups, step: StepGradients) -> None:
        """One histogram of the finite gradient values per charted layer, in TensorBoard."""
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        by_group: dict[int, list[Tensor]] = {}
        for g, i in zip(step.grads, step.positions, strict=True):
            if charted(groups.group_names[groups.group_of_param[i]], self.layers):
                by_group.setdefault(groups.group_of_param[i], []).append(g.detach().reshape(-1).float())
        logged_step = logger_step(trainer)
        for group, parts in by_group.items():
            values = torch.cat(parts)
            if step.unscale is not None:
                values = values * step.unscale.to(values.device)
            values = values[torch.isfinite(values)].cpu()
            if values.numel():
                for writer in writers:
                    writer.add_histogram(f"gradwatch/grad_hist/{groups.group_names[group]}", values, logged_step)

    def layout(
        self, pl_module: nn.Module, judged_by: str, grad_to_weight: bool, update_to_weight: bool
    ) -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars charts of the gradients and training-dynamics categories."""
        layers = list(dict.fromkeys(group_of(n, judged_by) for n, p in pl_module.named_parameters() if p.requires_grad))
        blocks = find_blocks(pl_module)
        plan, _ = plan_charts(
            layers, self.layers, self.group_by, blocks.names if blocks is not None else [], self.max_series
        )
        spans = layer_charts(plan.names)

        def per_layer(tag: str, title: str) -> dict[str, list[Any]]:
            return {
                f"{title}: {span}": ["Multiline", [exact_tags(f"gradwatch/{tag}/", names)]] for span, names in spans
            }

        gradients: dict[str, list[Any]] = {"global gradient norm": ["Multiline", [r"^gradwatch/global/grad_norm"]]}
        gradients.update(per_layer("grad_norm", "gradient norm"))
        if grad_to_weight:
            gradients.update(per_layer("grad_to_weight", "grad/weight ratio"))
        dynamics = per_layer("update_to_weight", "update/weight ratio") if update_to_weight else {}
        dynamics.update(per_layer("zero_fraction", "exactly-zero gradient fraction"))
        return {"gradwatch: gradients": gradients, "gradwatch: training dynamics": dynamics}


class FlowPictures:
    """The gradient-flow picture per optimizer (a depth profile per logging step), and the last steps' layer norms
    kept for a run that fails, written out only then.

    Args:
        norm_type: the norm of the kept layer norms.
        every_n_steps: draw the picture into TensorBoard every this many steps (``None``: only in the report).
    """

    def __init__(self, norm_type: float, every_n_steps: int | None) -> None:
        self.norm_type, self.every_n_steps = norm_type, every_n_steps
        self._flows: dict[str, GradientFlow] = {}  # per optimizer suffix
        self.rings: dict[str, NormRing] = {}  # the last steps' layer norms, written only if the run fails
        self.last_logged: dict[str, int] = {}  # per optimizer suffix, the last step whose norms were logged

    def start(self) -> None:
        """A new fit: nothing kept for it yet."""
        self.rings.clear()
        self.last_logged.clear()

    def draw(self, trainer: pl.Trainer, step: int, names: list[str], active_rms: list[float], suffix: str) -> None:
        """Keep this step's depth profile; at the slow cadence, draw the picture into TensorBoard (rank zero)."""
        flow = self._flows.setdefault(suffix, GradientFlow())
        flow.add(step, names, active_rms)
        every = self.every_n_steps
        writers = tensorboard_writers(trainer)
        if every is None or not writers or (logger_step(trainer) + 1) % every != 0:
            return
        self._write(flow, writers, suffix, logger_step(trainer))

    def write_evidence(self, trainer: pl.Trainer) -> None:
        """A failed run: the last steps' norms not logged yet go to the loggers at their own steps, and into the
        gradient-flow picture (TensorBoard and the report), so that the charts exist exactly when they are needed."""
        for suffix, ring in self.rings.items():
            recent = ring.read(self.last_logged.get(suffix, -1))
            if recent is None:
                continue
            write_recent(trainer, recent, suffix, self.norm_type)
            self.last_logged[suffix] = recent.steps[-1]
            flow = self._flows.setdefault(suffix, GradientFlow())
            for row in range(max(0, len(recent.steps) - 3), len(recent.steps)):
                flow.add(recent.steps[row], recent.names, recent.rms(row))
            self._write(flow, tensorboard_writers(trainer), suffix, recent.logger_steps[-1])

    def report_pictures(self, directory: str) -> list[tuple[str, str]]:
        """The pictures saved into ``directory`` for the health report: ``(title, file name)``."""
        pictures = []
        for suffix, flow in self._flows.items():
            name = f"gradient_flow{suffix}.png"
            if flow.save(os.path.join(directory, name)):
                pictures.append((f"Gradient flow across depth{suffix.replace('_', ' ')}", name))
        return pictures

    @staticmethod
    def _write(flow: GradientFlow, writers: list[Any], suffix: str, step: int) -> None:
        figure = flow.figure()
        if figure is not None:
            for writer in writers:
                writer.add_figure(f"gradwatch/gradient_flow{suffix}", figure, step, close=False)
            matplotlib_pyplot().close(figure)
