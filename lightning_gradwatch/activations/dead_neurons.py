"""DeadNeuronCallback: units of Linear/Conv layers that no longer fire under a rectifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._distributed import all_reduce_max
from lightning_gradwatch._probe_batch import ForwardFn
from lightning_gradwatch._types import Null, PositiveInt, UnitFraction
from lightning_gradwatch._validation import check_number
from lightning_gradwatch.activations._callback import ActivationCallback
from lightning_gradwatch.activations._probe import Layer
from lightning_gradwatch.alerts import AlertKind
from lightning_gradwatch.functional.activations import alive_units, segment_sum


class DeadNeuronCallback(ActivationCallback):
    r"""Log the fraction of dead units per layer and alert when a layer has too many.

    A unit (an output feature of a Linear layer, a channel of a Conv layer) is dead when its pre-activation was
    ``<= 0`` for every sample and position of the last ``window`` sampled training batches: under a rectifier it then
    outputs 0 and passes no gradient. ReLU is seen however it is written - ``nn.ReLU``, ``F.relu``, ``torch.relu``,
    ``x.relu()``, in place or not - and so are ``nn.ReLU6`` and ``LeakyReLU`` with slope 0; the unit is attributed to
    the Linear/Conv layer that fed the rectifier, also through a normalisation layer (``conv -> bn -> relu`` reports
    the conv). A rectifier applied to anything else (a residual sum, a reshaped tensor) is not counted, so it can
    never cause a false alarm; nor is a rectifier on the model's output (only hidden activations count).

    The window slides: each unit remembers the last sampled batch it fired in, so a unit that dies mid-run is dead
    ``window`` samples later, whatever the phase of the logging cadence. Under DDP a unit is dead only if it is dead
    on every rank's data (a max over ranks when a verdict is made, never per step).

    **Latency** at the defaults (a sample every 5 steps, a window of 6): units dead from the start are judged at step
    25; units that die at step ``s`` by ``s + 30``. The verdict rides on NaNGuard's per-step read when it is there
    (the preset, 32-bit and bf16), else it waits for the next logging step. A run shorter than a window is judged at
    its end on the samples it has (at least 3).

    **Severity**: a layer past ``threshold`` is ``info`` (some architectures keep a sparse layer and train fine); a
    ``warning`` when at least 90% of it is dead or its dead fraction grew by 0.2 since it crossed the threshold.

    Cost: nothing on steps that are not sampled; on a sampled step, forward hooks and a TorchFunctionMode for the
    forward pass only, and the window's update on the device.

    **Under torch.compile** the compiled graph gets no hook and no graph break: each sampled batch is run once more
    after the optimizer step, as the model's own eager code, in eval mode and without gradients, and that pass is
    watched (one extra forward per sampled step; with BatchNorm from step 50, when the running statistics eval mode
    uses have settled). Under FSDP/ModelParallel and ``torch.compile`` together it is inactive (one warning).

    Logs ``gradwatch/dead_fraction/{layer}``; alerts ``dead_neurons`` naming the layer.

    Args:
        threshold: a layer's dead fraction above this is reported (0 < threshold <= 1).
        sample_every_n_steps: sample the forward pass of every this many optimizer steps.
        window: sampled batches a verdict covers (the last ones).
        log_every_n_steps: log every this many optimizer steps; ``None`` follows the Trainer's ``log_every_n_steps``.
        layers: ``fnmatch`` patterns of the layers to chart (``"!pattern"`` leaves layers out); ``None``: all.
            Only the charts change: every layer is still judged.
        forward_fn: under ``torch.compile`` only: ``forward_fn(module, batch)`` runs the model on a sampled
            training batch (the eager pass that is watched); default ``module(batch)``, ``module(batch[0])`` for a
            tuple or list.

    Raises:
        ValueError: an argument outside its range, naming it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import DeadNeuronCallback

        trainer = Trainer(callbacks=[DeadNeuronCallback(threshold=0.2)])
    """

    kinds = frozenset({"relu"})
    metric = "dead_fraction"
    chart = "dead units (fraction per layer)"
    alert_kind = AlertKind.DEAD_NEURONS
    tally_keys = ("layers", "last_alive", "last_seen")

    def __init__(
        self,
        threshold: UnitFraction = 0.3,
        sample_every_n_steps: PositiveInt = 5,
        window: PositiveInt = 6,
        log_every_n_steps: PositiveInt | Null = None,
        layers: list[str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(sample_every_n_steps, window, log_every_n_steps, layers, forward_fn)
        self.threshold = check_number("threshold", threshold, gt=0, le=1)
        # all layers' units end to end: the last sample each unit fired in; per layer: the last it fed a rectifier
        self._last_alive: Tensor | None = None
        self._last_seen: Tensor | None = None
        self._names: list[str] = []
        self._offsets: list[int] = []
        self._segment_ids: Tensor | None = None
        self._units: Tensor | None = None
        self._seen_any = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, sample_every_n_steps=self.sample_every_n_steps)

    @override
    def _layout(self, layers: list[Layer], device: torch.device) -> None:
        names = [layer.name for layer in layers]
        if self._last_alive is not None and self._names == names:
            if self._last_alive.device != device:
                for attr in ("_last_alive", "_last_seen", "_segment_ids", "_units"):
                    setattr(self, attr, getattr(self, attr).to(device))
            return
        sizes = [layer.units for layer in layers]
        self._names = names
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)
        self._units = torch.tensor(sizes, dtype=torch.float32, device=device)
        self._segment_ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), self._units.long())
        self._last_alive = torch.full((self._offsets[-1],), -1.0, device=device)
        self._last_seen = torch.full((len(layers),), -1.0, device=device)
        loaded = self._take_loaded(names)
        if loaded is not None:  # resume the window the checkpoint was in
            self._last_alive.copy_(loaded["last_alive"])
            self._last_seen.copy_(loaded["last_seen"])

    @override
    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> Tensor | None:
        spec = self._layers[layer]
        if pre_activation.dim() == 0 or pre_activation.shape[spec.unit_dim] != spec.units:
            return None  # e.g. an unbatched conv input: the unit axis is not where the layer says
        return alive_units(pre_activation, spec.unit_dim)

    @override
    def _accumulate(self, layer: int, kind: str, stat: Tensor) -> None:
        assert self._last_alive is not None and self._last_seen is not None
        units = self._last_alive[self._offsets[layer] : self._offsets[layer + 1]]
        units.copy_(torch.where(stat.to(units.device), float(self._samples), units))
        self._last_seen[layer] = float(self._samples)
        self._seen_any = True  # known on the host: the layout needs no read

    @override
    def _fractions(self, window: int) -> tuple[Tensor, Tensor]:
        assert self._last_alive is not None and self._last_seen is not None
        assert self._segment_ids is not None and self._units is not None
        # alive anywhere means alive: max over ranks, one collective per verdict (same size on every rank)
        last = all_reduce_max(torch.cat([self._last_alive, self._last_seen]))
        n = self._offsets[-1]
        newest = float(self._samples - 1)
        dead = (newest - last[:n]) >= window  # not alive in the last `window` samples
        fractions = segment_sum(dead, self._segment_ids, len(self._names)) / self._units.clamp_min(1)
        return fractions, last[n:] > newest - window

    @override
    def _describe(self, layer: Layer, step: int, fraction: float, window: int) -> str:
        return (
            f"Dead units in '{layer.name}' at step {step}: {fraction:.0%} of its {layer.units} units produced no "
            f"positive activation over the last {window} sampled batches (threshold {self.threshold:.0%})."
        )

    @override
    def _layers_seen(self) -> bool:
        return self._seen_any

    @override
    def _tallies(self) -> dict[str, Any] | None:
        if self._last_alive is None or self._last_seen is None:
            return None
        return {"layers": list(self._names), "last_alive": self._last_alive.cpu(), "last_seen": self._last_seen.cpu()}

    @override
    def _forget_layout(self) -> None:
        self._last_alive = self._last_seen = None
        self._names = []
