"""GradientGeometry: shattered gradients, block-Jacobian conditioning and activation histograms, on a slow cadence."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gradwatch._distributed import all_reduce_sum, is_sharded
from lightning_gradwatch._layout import exact_tags, layer_charts
from lightning_gradwatch._probe_batch import (
    BATCHNORM_WARMUP,
    CAN_RUN_EAGERLY,
    ForwardFn,
    check_forward_fn,
    eagerly,
    first_rows,
    tracks_batch_statistics,
)
from lightning_gradwatch._reporting import host_values, logger_step, tensorboard_writers
from lightning_gradwatch._types import GreaterThanOne, NonNegativeInt, Null, OpenUnitInterval, PositiveInt, UnitFraction
from lightning_gradwatch._validation import check_bool, check_number, check_patterns
from lightning_gradwatch.activations._probe import compiled_modules, probe_for
from lightning_gradwatch.alerts import Alert, AlertKind, alert_message
from lightning_gradwatch.core.callback import GradwatchCallback
from lightning_gradwatch.functional.geometry import gain_product
from lightning_gradwatch.geometry._probe import ActivationSample, Blocks, find_blocks, probe_geometry


class GradientGeometry(GradwatchCallback):
    r"""Measure gradient coherence (shattering), block-Jacobian gains and activation histograms every
    ``every_n_steps`` on a small fixed probe batch; alert on shattered, vanishing or exploding geometry.

    On a probe step (steps 0, ``every_n_steps``, ...; with BatchNorm the first waits for its running statistics),
    after the optimizer step, the model runs in eval mode on the probe batch - the first ``probe_size`` samples of
    the first probed training batch, kept for the whole run - and its training flags are restored exactly. No
    parameter's gradient, no BatchNorm statistic and no random-number stream of the run is touched. Steps that are
    not probed cost nothing: no hook, no host sync.

    - Coherence (Balduzzi et al. 2017): the gradient of a fixed random projection of the output with respect to each
      block's input, at the probe inputs and with the first block's input moved by ``radius`` (relative,
      orthogonally); their cosine, averaged over samples. A deep plain ReLU net falls towards 0, a residual net
      stays high.
    - Block-Jacobian spectrum (Saxe et al. 2014, Pennington et al. 2017): for each block that keeps its input's
      shape, the root mean squared singular value of its input-output Jacobian (the gain of a gradient passing back
      through it) and its largest singular value (power iteration), from vector-Jacobian products on the probe
      pass's graph; the product of the gains predicts vanishing or exploding gradients and the extreme gain names
      the block.
    - Histograms of the activations (outputs of ReLU, sigmoid, tanh, GELU, SiLU) of the probe pass, per layer,
      from the shared activation probe; TensorBoard only, rank zero.

    Blocks: ``blocks`` if given, else found as described in :mod:`lightning_gradwatch.geometry._probe` (a transformer's
    layers, a ResNet's blocks, a ``Sequential``'s stages). Under DDP every rank probes its own batch at the same
    step and the measurements are averaged with one all-reduce, so every rank reaches the same alerts; rank zero
    logs. Under ``torch.compile`` the probe runs the model's own code eagerly: the compiled graph gets no hook
    and no graph break. Inactive, with a warning, under FSDP/ModelParallel, or when no blocks are found.

    Logs ``gradwatch/gradient_coherence/{block}``, ``gradwatch/jacobian_gain/{block}``,
    ``gradwatch/jacobian_sigma_max/{block}``, ``gradwatch/geometry/{gradient_coherence,jacobian_gain_product,
    probe_seconds}`` and histograms ``gradwatch/activations/{layer}``. Alerts ``shattered_gradient``,
    ``vanishing_jacobian``, ``exploding_jacobian``.

    Args:
        every_n_steps: probe every this many optimizer steps.
        probe_size: samples kept from the training batch for the probe.
        radius: relative distance between the nearby points of the coherence (``0 < radius <= 1``).
        power_iterations: power-iteration steps for the largest singular value (0 skips it).
        blocks: names of the modules to treat as blocks, in forward order (``None``: found automatically).
        forward_fn: ``forward_fn(module, batch)`` runs the model on a (probe) batch; default ``module(batch[0])``.
        shattered_threshold: alert when the coherence at the first block's input is below this; ``None`` disables.
        vanishing_gain: alert when the product of the block gains is below this; ``None`` disables.
        exploding_gain: alert when the product of the block gains is above this; ``None`` disables.
        histograms: write the activation histograms.
        seed: seed of the probe's own random directions (the same at every probe).

    Raises:
        ValueError: an argument out of range, or (at fit start) a name in ``blocks`` the model does not have.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientGeometry

        trainer = Trainer(callbacks=[GradientGeometry(every_n_steps=500)])
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 500,
        probe_size: PositiveInt = 16,
        radius: UnitFraction = 0.3,
        power_iterations: NonNegativeInt = 3,
        blocks: list[str] | None = None,
        forward_fn: ForwardFn | None = None,
        shattered_threshold: OpenUnitInterval | Null = 0.4,
        vanishing_gain: OpenUnitInterval | Null = 1e-3,
        exploding_gain: GreaterThanOne | Null = 1e2,
        histograms: bool = True,
        seed: NonNegativeInt = 20170228,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_number("every_n_steps", every_n_steps, ge=1, integer=True)
        self.probe_size = check_number("probe_size", probe_size, ge=1, integer=True)
        self.radius = check_number("radius", radius, gt=0, le=1)
        self.power_iterations = check_number("power_iterations", power_iterations, ge=0, integer=True)
        self.blocks = check_patterns("blocks", blocks, optional=True)
        self.forward_fn = check_forward_fn(forward_fn)
        self.shattered_threshold = check_number("shattered_threshold", shattered_threshold, gt=0, lt=1, optional=True)
        self.vanishing_gain = check_number("vanishing_gain", vanishing_gain, gt=0, lt=1, optional=True)
        self.exploding_gain = check_number("exploding_gain", exploding_gain, gt=1, optional=True)
        self.histograms = check_bool("histograms", histograms)
        self.seed = check_number("seed", seed, ge=0, integer=True)
        self._blocks: Blocks | None = None
        self._first_step = 0
        self._step_at_start = -1
        self._probe_batch: Any = None
        self._active = False
        self._warned: set[str] = set()
        self._pending = False
        self._sample = ActivationSample()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, blocks=self.blocks)

    # -- lifecycle -------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._blocks = find_blocks(pl_module, self.blocks)  # raises on unknown names, before the layout
        super().on_fit_start(trainer, pl_module)
        reason = None
        if compiled_modules(pl_module) and not CAN_RUN_EAGERLY:
            reason = "the model runs under torch.compile and this torch has no torch.compiler.set_stance (>= 2.6)"
        elif is_sharded(trainer):
            reason = "its parameters are sharded (FSDP/ModelParallel): the probe runs the unwrapped model"
        elif self._blocks is None:
            reason = "no blocks were found: pass `blocks=[...]` (module names in forward order)"
        self._active, self._pending = reason is None, False
        if reason is not None:
            self._warn_once(reason, f"GradientGeometry is inactive in this run: {reason}.")
        batchnorm = tracks_batch_statistics(pl_module)
        self._first_step = min(self.every_n_steps, BATCHNORM_WARMUP) if batchnorm else 0
        self._probe_batch = None  # a new fit takes a new probe batch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step

    def _due(self, step: int) -> bool:
        return step == self._first_step or (step > self._first_step and step % self.every_n_steps == 0)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_probe(trainer, pl_module, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        # decided on the host from the step counter: the same on every rank, and nothing to do on other steps
        if trainer.global_step > self._step_at_start and self._due(logger_step(trainer)):  # an optimizer step ended
            self._pending = True
        # another callback still watching a forward pass (a step without backward): ours would join its tallies
        if not (self._active and self._pending) or probe_for(pl_module).subscribers:
            return
        self._pending = False
        if self._probe_batch is None:
            n = self.probe_size
            self._probe_batch = first_rows(batch, n)
        try:
            self._probe(trainer, pl_module)
        except Exception as err:  # a model the probe cannot run: our pass, never the run's end (warned)
            self._active = False
            self._warn_once("failed", f"GradientGeometry could not probe this model and is now inactive: {err}")

    # -- the probe -------------------------------------------------------------------------------------------
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._blocks is not None
        started = time.perf_counter()
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(self.seed)  # the same directions at every probe
        watch = self.histograms and trainer.is_global_zero and bool(tensorboard_writers(trainer))
        with eagerly():  # under torch.compile: the model's own code runs, the compiled graph is left untouched
            result = probe_geometry(
                pl_module,
                self._blocks,
                lambda: self.forward_fn(pl_module, self._probe_batch),
                radius=self.radius,
                power_iterations=self.power_iterations,
                generator=generator,
                clean_forward_context=self._sample.subscribed(pl_module) if watch else None,
            )
        n = len(self._blocks.names)
        measured = torch.cat([result.coherence, result.gain.pow(2), result.sigma_max])
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        measured = all_reduce_sum(measured) / world  # every rank's probe batch, averaged: the same alerts everywhere
        samples = self._sample.take() if watch else []
        fetched = host_values(measured, *(v for _, v in samples))  # the probe's one host transfer
        values = fetched[0]
        coherence, gains, sigmas = values[:n], [math.sqrt(g) for g in values[n : 2 * n]], values[2 * n :]
        self._report(trainer, coherence, gains, sigmas, result.square, time.perf_counter() - started)
        for writer in tensorboard_writers(trainer) if samples else []:
            for (name, _), data in zip(samples, fetched[1:], strict=True):
                writer.add_histogram(f"gradwatch/activations/{name}", torch.tensor(data), logger_step(trainer))

    def _report(
        self,
        trainer: pl.Trainer,
        coherence: list[float],
        gains: list[float],
        sigmas: list[float],
        square: list[bool],
        seconds: float,
    ) -> None:
        assert self._blocks is not None
        names, step = self._blocks.names, logger_step(trainer)  # the step just trained, as logged
        metrics: dict[str, float] = {"gradwatch/geometry/probe_seconds": seconds}
        for name, c in zip(names, coherence, strict=True):
            if not math.isnan(c):
                metrics[f"gradwatch/gradient_coherence/{name}"] = c
        spectrum = [(name, g, s) for name, g, s, sq in zip(names, gains, sigmas, square, strict=True) if sq]
        for name, g, s in spectrum:
            metrics[f"gradwatch/jacobian_gain/{name}"] = g
            if not math.isnan(s):
                metrics[f"gradwatch/jacobian_sigma_max/{name}"] = s
        site = coherence[0]
        if not math.isnan(site):
            metrics["gradwatch/geometry/gradient_coherence"] = site
        product = float(gain_product(torch.tensor([g for _, g, _ in spectrum]))) if spectrum else math.nan
        if not math.isnan(product):
            metrics["gradwatch/geometry/jacobian_gain_product"] = product
        if all(math.isnan(c) for c in coherence):
            self._warn_once(
                "unreached",
                "GradientGeometry: no gradient reached the blocks' inputs: check that `forward_fn` returns the "
                f"model's output and that the blocks ({', '.join(names[:3])}, ...) run in its forward pass.",
            )
        if spectrum and all(math.isnan(s) for _, _, s in spectrum) and self.power_iterations:
            self._warn_once(
                "sigma",
                "GradientGeometry: no largest singular value could be estimated (an operation "
                "in the blocks has no double backward); gains are still measured.",
            )
        self._log_metrics(trainer, metrics)
        self._check_shattered(trainer, step, names, coherence)
        self._check_gains(trainer, step, spectrum, product)

    def _check_shattered(self, trainer: pl.Trainer, step: int, names: list[str], coherence: list[float]) -> None:
        threshold, site = self.shattered_threshold, coherence[0]
        if threshold is None or math.isnan(site):
            return
        low = 0
        while low < len(coherence) and coherence[low] < threshold:  # the blocks (from the first) below threshold
            low += 1
        where = f"'{names[0]}'" if low <= 1 else f"the inputs of '{names[0]}' to '{names[low - 1]}'"
        finding = (
            f"Shattered gradients at step {step}: the input gradients at nearby probe points (relative distance "
            f"{self.radius:g}) have coherence {site:.2f} at {where} (threshold {threshold:g}; 1 is smooth, 0 is "
            f"white noise), so the loss surface the optimizer sees there changes faster than it can follow."
        )
        self._set_condition(
            trainer,
            AlertKind.SHATTERED_GRADIENT,
            names[0],
            site < threshold,
            lambda: Alert(
                step,
                AlertKind.SHATTERED_GRADIENT,
                names[0],
                site,
                threshold,
                alert_message(AlertKind.SHATTERED_GRADIENT, finding),
            ),
        )

    def _check_gains(
        self, trainer: pl.Trainer, step: int, spectrum: list[tuple[str, float, float]], product: float
    ) -> None:
        if not spectrum or math.isnan(product):
            return
        for kind, threshold, firing, pick in (
            (AlertKind.VANISHING_JACOBIAN, self.vanishing_gain, lambda t: product < t, min),
            (AlertKind.EXPLODING_JACOBIAN, self.exploding_gain, lambda t: product > t, max),
        ):
            if threshold is None:
                continue
            name, gain, sigma = pick(spectrum, key=lambda item: item[1])
            finding = (
                f"Block Jacobians at step {step}: the gains of the {len(spectrum)} blocks multiply to {product:.3g} "
                f"(threshold {threshold:g}): a gradient crossing them back to '{spectrum[0][0]}' is scaled by that "
                f"much. '{name}' breaks isometry most (gain {gain:.3g}, largest singular value {sigma:.3g}; "
                "isometric blocks have both near 1)."
            )
            self._set_condition(
                trainer,
                kind,
                "",
                firing(threshold),
                functools.partial(Alert, step, kind, name, product, threshold, alert_message(kind, finding)),
            )

    # -- TensorBoard -----------------------------------------------------------------------------------------
    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        if self._blocks is None:
            return {}
        charts: dict[str, list[Any]] = {
            "coherence at the first block's input": ["Multiline", [r"^gradwatch/geometry/gradient_coherence$"]],
            "product of the block gains (log axis)": ["Multiline", [r"^gradwatch/geometry/jacobian_gain_product$"]],
            "probe time (s)": ["Multiline", [r"^gradwatch/geometry/probe_seconds$"]],
        }
        for metric, label in (
            ("gradient_coherence", "coherence"),
            ("jacobian_gain", "Jacobian gain"),
            ("jacobian_sigma_max", "Jacobian σ_max"),
        ):
            for title, names in layer_charts(self._blocks.names):
                charts[f"{label}: {title}"] = ["Multiline", [exact_tags(f"gradwatch/{metric}/", names)]]
        return {"gradwatch: geometry": charts}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)
