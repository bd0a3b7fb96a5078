"""DeadNeuronCallback: units of Linear/Conv layers that no longer fire under a rectifier."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._activations import ActivationCallback, Layer
from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._types import PositiveInt, UnitFraction
from lightning_gradwatch._validation import check_number
from lightning_gradwatch.alerts import AlertKind, with_remedy
from lightning_gradwatch.functional.activations import alive_units, dead_fractions


class DeadNeuronCallback(ActivationCallback):
    r"""Log the fraction of dead units per layer and alert when a layer has too many.

    A unit (an output feature of a Linear layer, a channel of a Conv layer) is dead when its pre-activation was
    ``<= 0`` for every sample and position of a window of sampled training batches: under a rectifier it then
    outputs 0 and passes no gradient. ReLU is seen however it is written - ``nn.ReLU``, ``F.relu``,
    ``torch.relu``, ``x.relu()``, in place or not - and so are ``nn.ReLU6`` and ``LeakyReLU`` with slope 0; the
    unit is attributed to the Linear/Conv layer that fed the rectifier, also through a normalisation layer
    (``conv -> bn -> relu`` reports the conv). A rectifier applied to anything else (a residual sum, a reshaped
    tensor) is not counted, so it can never cause a false alarm; nor is a rectifier on the model's output (only
    hidden activations, followed by another layer in the same forward pass, count).

    Tallies are per window and start afresh after each check, so a unit that was alive early and died later is
    caught at the end of the next window. Under DDP a unit is dead only if it is dead on every rank's data: the
    "alive" tallies are reduced across ranks once per check (one all-reduce), never per step.

    Cost: nothing on steps that are not sampled. On a sampled step, forward hooks and a TorchFunctionMode are
    installed for the forward pass only (never in validation, the sanity check or prediction) and the tallies
    accumulate on device. The check runs on the Trainer's first logging step after the window is full and brings
    the tallies to the host in one transfer, so no other step waits on the device. When the model runs under
    ``torch.compile`` the callback stays inactive and warns once: the probe would force a recompilation.

    Logs ``gradwatch/dead_fraction/{layer}``; alerts ``dead_neurons`` naming the layer.

    Args:
        threshold: alert when a layer's dead fraction exceeds this (0 < threshold <= 1).
        sample_every_n_steps: sample the forward pass of every this many optimizer steps.
        window: sampled batches per check; the tallies cover these (and any sampled before the next logging
            step) and then reset.
        log_every_n_steps: check and log on every this many optimizer steps once the window is full; ``None``
            follows the Trainer's ``log_every_n_steps``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import DeadNeuronCallback

        trainer = Trainer(callbacks=[DeadNeuronCallback(threshold=0.2)])
    """

    kinds = frozenset({"relu"})
    metric = "dead_fraction"
    chart = "dead units (fraction per layer)"
    alert_kind = AlertKind.DEAD_NEURONS
    tally_keys = ("layers", "alive", "seen")

    def __init__(
        self,
        threshold: UnitFraction = 0.3,
        sample_every_n_steps: PositiveInt = 10,
        window: PositiveInt = 10,
        log_every_n_steps: PositiveInt | None = None,
    ) -> None:
        super().__init__(sample_every_n_steps, window, log_every_n_steps)
        self.threshold = check_number("threshold", threshold, gt=0, le=1)
        # all layers' units end to end: alive in this window; per layer: fed a rectifier in this window
        self._alive: Tensor | None = None
        self._seen: Tensor | None = None
        self._names: list[str] = []
        self._offsets: list[int] = []
        self._segment_ids: Tensor | None = None
        self._units: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, sample_every_n_steps=self.sample_every_n_steps)

    @override
    def _layout(self, layers: list[Layer], device: torch.device) -> None:
        names = [layer.name for layer in layers]
        if self._alive is not None and len(self._offsets) == len(layers) + 1 and self._names == names:
            if self._alive.device != device:
                self._move(device)
            return
        sizes = [layer.units for layer in layers]
        self._names = names
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)
        self._units = torch.tensor(sizes, dtype=torch.float32, device=device)
        self._segment_ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), self._units.long())
        self._alive = torch.zeros(self._offsets[-1], dtype=torch.bool, device=device)
        self._seen = torch.zeros(len(layers), dtype=torch.bool, device=device)
        loaded = self._take_loaded(names)
        if loaded is not None:  # resume the window the checkpoint was in
            self._alive.copy_(loaded["alive"])
            self._seen.copy_(loaded["seen"])

    def _move(self, device: torch.device) -> None:
        for attr in ("_alive", "_seen", "_segment_ids", "_units"):
            setattr(self, attr, getattr(self, attr).to(device))

    @override
    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> Tensor | None:
        spec = self._layers[layer]
        if pre_activation.dim() == 0 or pre_activation.shape[spec.unit_dim] != spec.units:
            return None  # e.g. an unbatched conv input: the unit axis is not where the layer says
        return alive_units(pre_activation, spec.unit_dim)

    @override
    def _accumulate(self, layer: int, kind: str, stat: Tensor) -> None:
        assert self._alive is not None and self._seen is not None
        self._alive[self._offsets[layer] : self._offsets[layer + 1]] |= stat.to(self._alive.device)
        self._seen[layer] = True

    @override
    def _check(self, trainer: pl.Trainer) -> None:
        assert self._alive is not None and self._seen is not None
        assert self._segment_ids is not None and self._units is not None
        # alive anywhere means alive: max over ranks, one collective per check (same size on every rank)
        reduced = all_reduce_max(torch.cat([self._alive.to(torch.float32), self._seen.to(torch.float32)]))
        n_units = self._offsets[-1]
        fractions = dead_fractions(reduced[:n_units], self._segment_ids, self._units)
        fraction_values, seen_values = host_values(fractions, reduced[n_units:])  # one transfer
        self._alive.zero_()
        self._seen.zero_()
        step, findings = trainer.global_step, []
        for index, (name, fraction, seen) in enumerate(zip(self._names, fraction_values, seen_values, strict=True)):
            if not seen:
                continue
            size = self._layers[index].units
            message = with_remedy(
                AlertKind.DEAD_NEURONS,
                f"Dead units in '{name}' at step {step}: {fraction:.0%} of its {size} units produced no "
                f"positive activation over the last {self._batches_in_window} sampled batches (threshold "
                f"{self.threshold:.0%}).",
            )
            findings.append((name, fraction, message))
        self._report(trainer, findings)

    @override
    def _tallies(self) -> dict[str, Any] | None:
        if self._alive is None or self._seen is None:
            return None
        return {"layers": list(self._names), "alive": self._alive.cpu(), "seen": self._seen.cpu()}

    @override
    def _forget_layout(self) -> None:
        self._alive = self._seen = None
        self._names = []
