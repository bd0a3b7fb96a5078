"""SaturationCallback: sigmoid and tanh outputs stuck at their bounds."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._activations import ActivationCallback
from lightning_gradwatch._core import all_reduce_sum, check_fraction, host_values
from lightning_gradwatch.alerts import Alert, AlertKind
from lightning_gradwatch.functional.activations import saturated_count, saturation_bound

_BOUNDS = {"sigmoid": "0 or 1", "tanh": "-1 or 1"}


class SaturationCallback(ActivationCallback):
    r"""Log, per layer, the fraction of sigmoid and tanh outputs that are saturated, and alert when it is high.

    An output is saturated when it lies within ``margin`` of the function's bounds (sigmoid: 0 or 1; tanh: -1 or
    1), where its gradient all but vanishes. Sigmoid and tanh are seen however they are written - ``nn.Sigmoid``,
    ``nn.Tanh``, ``torch.sigmoid``, ``torch.tanh``, ``F.sigmoid``, ``F.tanh``, ``x.sigmoid()`` - and attributed to
    the Linear/Conv layer that fed them (also through a normalisation layer). Out of reach, and therefore never
    reported: hard-sigmoid and hard-tanh (piecewise linear), and the gates inside fused recurrent layers
    (``nn.LSTM``, ``nn.GRU``), which run as single C++ kernels.

    The fraction is over a window of sampled training batches; under DDP the counts are summed across ranks once
    per check. Cost as for :class:`~lightning_gradwatch.DeadNeuronCallback`: nothing on unsampled steps, forward
    hooks and a TorchFunctionMode for the forward pass of sampled steps only, one transfer per check.

    Logs ``gradwatch/saturation/{layer}``; alerts ``saturation`` naming the layer.

    Args:
        threshold: alert when a layer's saturated fraction exceeds this (0 < threshold <= 1).
        margin: how close to a bound counts as saturated (0 < margin < 0.5).
        sample_every_n_steps: sample the forward pass of every this many optimizer steps.
        window: sampled batches per check.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import SaturationCallback

        trainer = Trainer(callbacks=[SaturationCallback(threshold=0.5, margin=0.01)])
    """

    kinds = {"sigmoid", "tanh"}

    def __init__(
        self, threshold: float = 0.2, margin: float = 0.01, sample_every_n_steps: int = 10, window: int = 10
    ) -> None:
        check_fraction("threshold", threshold)
        if not (isinstance(margin, (int, float)) and not isinstance(margin, bool) and 0 < margin < 0.5):
            raise ValueError(f"`margin` must be a number with 0 < margin < 0.5, got {margin!r}.")
        super().__init__(sample_every_n_steps, window)
        self.threshold = float(threshold)
        self.margin = float(margin)
        self._bounds = {kind: saturation_bound(kind, self.margin) for kind in self.kinds}
        # layer -> [saturated count, element count, kind]
        self._counts: dict[str, list[Any]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, margin=self.margin)

    @override
    def _record(self, layer: str, unit_dim: int, kind: str, pre_activation: Tensor) -> None:
        saturated = saturated_count(pre_activation, self._bounds[kind])
        entry = self._counts.get(layer)
        if entry is None:
            self._counts[layer] = [saturated, float(pre_activation.numel()), kind]
        else:
            entry[0] = entry[0] + saturated
            entry[1] += pre_activation.numel()

    @override
    def _check(self, trainer: pl.Trainer) -> None:
        if not self._counts:
            return
        layers = sorted(self._counts)
        device = self._counts[layers[0]][0].device
        totals = torch.tensor([self._counts[n][1] for n in layers], device=device, dtype=torch.float32)
        saturated = torch.stack([self._counts[n][0].to(device) for n in layers])
        reduced = all_reduce_sum(torch.cat([saturated, totals]))  # one collective per check
        (values,) = host_values(reduced)
        kinds = [self._counts[n][2] for n in layers]
        self._counts.clear()
        step, metrics = trainer.global_step, {}
        for i, (name, kind) in enumerate(zip(layers, kinds, strict=True)):
            fraction = values[i] / max(values[len(layers) + i], 1.0)
            metrics[f"gradwatch/saturation/{name}"] = fraction
            self._set_condition(
                trainer,
                AlertKind.SATURATION,
                name,
                fraction > self.threshold,
                lambda name=name, kind=kind, fraction=fraction: Alert(
                    step=step,
                    kind=AlertKind.SATURATION,
                    name=name,
                    value=fraction,
                    threshold=self.threshold,
                    message=(
                        f"Saturated {kind} after '{name}' at step {step}: {fraction:.0%} of its outputs lie within "
                        f"{self.margin:g} of {_BOUNDS[kind]} over the last {self.window} sampled batches (threshold "
                        f"{self.threshold:.0%}), where their gradient all but vanishes. Usual remedies: ReLU-family "
                        "activations, normalisation layers (BatchNorm/LayerNorm), smaller weight initialisation."
                    ),
                ),
            )
        self._log_metrics(trainer, metrics)

    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        return {
            "gradwatch: activations": {
                "saturated outputs (fraction per layer)": ["Multiline", [r"^gradwatch/saturation/"]]
            }
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        counts = {k: [float(v[0]), v[1], v[2]] for k, v in self._counts.items()}
        return {"counts": counts, "batches_in_window": self._batches_in_window}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._counts = {
            str(k): [torch.tensor(v[0]), float(v[1]), str(v[2])] for k, v in state.get("counts", {}).items()
        }
        self._batches_in_window = int(state.get("batches_in_window", 0))
