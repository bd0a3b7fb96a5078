"""DeadNeuronCallback: units of Linear/Conv layers that no longer fire under a rectifier."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._activations import ActivationCallback
from lightning_gradwatch._core import all_reduce_max, check_fraction, host_values
from lightning_gradwatch.alerts import Alert, AlertKind
from lightning_gradwatch.functional.activations import alive_units


class DeadNeuronCallback(ActivationCallback):
    r"""Log the fraction of dead units per layer and alert when a layer has too many.

    A unit (an output feature of a Linear layer, a channel of a Conv layer) is dead when its pre-activation was
    ``<= 0`` for every sample and position of a window of sampled training batches: under a rectifier it then
    outputs 0 and passes no gradient. ReLU is seen however it is written - ``nn.ReLU``, ``F.relu``,
    ``torch.relu``, ``x.relu()``, in place or not - and so are ``nn.ReLU6`` and ``LeakyReLU`` with slope 0; the
    unit is attributed to the Linear/Conv layer that fed the rectifier, also through a normalisation layer
    (``conv -> bn -> relu`` reports the conv). A rectifier applied to anything else (a residual sum, a reshaped
    tensor) is not counted, so it can never cause a false alarm.

    Tallies are per window and start afresh after each check, so a unit that was alive early and died later is
    caught at the end of the next window. Under DDP a unit is dead only if it is dead on every rank's data: the
    "alive" tallies are reduced across ranks once per check (one all-reduce), never per step.

    Cost: nothing on steps that are not sampled. On a sampled step, forward hooks and a TorchFunctionMode are
    installed for the forward pass only (never in validation, the sanity check or prediction) and the tallies
    accumulate on device; the check brings them to the host in one transfer.

    Logs ``gradwatch/dead_fraction/{layer}``; alerts ``dead_neurons`` naming the layer.

    Args:
        threshold: alert when a layer's dead fraction exceeds this (0 < threshold <= 1).
        sample_every_n_steps: sample the forward pass of every this many optimizer steps.
        window: sampled batches per check; the tallies cover these and then reset.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import DeadNeuronCallback

        trainer = Trainer(callbacks=[DeadNeuronCallback(threshold=0.2)])
    """

    kinds = {"relu"}

    def __init__(self, threshold: float = 0.3, sample_every_n_steps: int = 10, window: int = 10) -> None:
        check_fraction("threshold", threshold)
        super().__init__(sample_every_n_steps, window)
        self.threshold = float(threshold)
        self._alive: dict[str, Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, sample_every_n_steps=self.sample_every_n_steps)

    @override
    def _record(self, layer: str, unit_dim: int, kind: str, pre_activation: Tensor) -> None:
        alive = alive_units(pre_activation, unit_dim)
        known = self._alive.get(layer)
        self._alive[layer] = alive if known is None or known.shape != alive.shape else known | alive

    @override
    def _check(self, trainer: pl.Trainer) -> None:
        if not self._alive:
            return
        layers = sorted(self._alive)
        sizes = [self._alive[name].numel() for name in layers]
        # alive anywhere means alive: max over ranks, one collective per check
        alive = all_reduce_max(torch.cat([self._alive[name].to(torch.float32) for name in layers]))
        (values,) = host_values(alive)
        self._alive.clear()
        step, start = trainer.global_step, 0
        metrics = {}
        for name, size in zip(layers, sizes, strict=True):
            fraction = 1.0 - sum(values[start : start + size]) / size
            start += size
            metrics[f"gradwatch/dead_fraction/{name}"] = fraction
            self._set_condition(
                trainer,
                AlertKind.DEAD_NEURONS,
                name,
                fraction > self.threshold,
                lambda name=name, fraction=fraction, size=size: Alert(
                    step=step,
                    kind=AlertKind.DEAD_NEURONS,
                    name=name,
                    value=fraction,
                    threshold=self.threshold,
                    message=(
                        f"Dead units in '{name}' at step {step}: {fraction:.0%} of its {size} units produced no "
                        f"positive activation over the last {self.window} sampled batches (threshold "
                        f"{self.threshold:.0%}). Usual remedies: LeakyReLU or GELU instead of ReLU, a lower learning "
                        "rate, He initialisation, biases not initialised negative."
                    ),
                ),
            )
        self._log_metrics(trainer, metrics)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        return {
            "gradwatch: activations": {"dead units (fraction per layer)": ["Multiline", [r"^gradwatch/dead_fraction/"]]}
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"alive": {k: v.cpu() for k, v in self._alive.items()}, "batches_in_window": self._batches_in_window}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._alive = {str(k): v.clone() for k, v in state.get("alive", {}).items()}
        self._batches_in_window = int(state.get("batches_in_window", 0))
