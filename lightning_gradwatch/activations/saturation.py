"""SaturationCallback: sigmoid and tanh outputs stuck at their bounds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._distributed import all_reduce_sum
from lightning_gradwatch._probe_batch import ForwardFn
from lightning_gradwatch._types import Null, OpenHalfUnit, PositiveInt, UnitFraction
from lightning_gradwatch._validation import check_number
from lightning_gradwatch.activations._callback import ActivationCallback
from lightning_gradwatch.activations._probe import Layer
from lightning_gradwatch.alerts import AlertKind
from lightning_gradwatch.functional.activations import saturated_count, saturation_bound

_BOUNDS = {"sigmoid": "0 or 1", "tanh": "-1 or 1"}


class SaturationCallback(ActivationCallback):
    r"""Log, per layer, the fraction of sigmoid and tanh outputs that are saturated, and alert when it is high.

    An output is saturated when it lies within ``margin`` of the function's bounds (sigmoid: 0 or 1; tanh: -1 or
    1), where its gradient all but vanishes. Sigmoid and tanh are seen however they are written - ``nn.Sigmoid``,
    ``nn.Tanh``, ``torch.sigmoid``, ``torch.tanh``, ``F.sigmoid``, ``F.tanh``, ``x.sigmoid()`` - and attributed to
    the Linear/Conv layer that fed them (also through a normalisation layer). Only hidden activations count: a
    sigmoid on the model's output (a binary classifier's probabilities, a VAE's reconstruction) may rightly sit near
    0 or 1 and is never reported. Out of reach, and never reported: hard-sigmoid and hard-tanh (piecewise linear),
    and the gates inside fused recurrent layers (``nn.LSTM``, ``nn.GRU``), which run as single C++ kernels.

    The fraction is over a sliding window of the last ``window`` sampled batches; under DDP the counts are summed
    across ranks when a verdict is made. Latency, severity (``info`` when a layer crosses the threshold, ``warning``
    when 90% of it saturates or the fraction grew by 0.2) and cost are as for
    :class:`~lightning_gradwatch.DeadNeuronCallback`.

    Logs ``gradwatch/saturation/{layer}``; alerts ``saturation`` naming the layer.

    Args:
        threshold: a layer's saturated fraction above this is reported (0 < threshold <= 1).
        margin: how close to a bound counts as saturated (0 < margin < 0.5).
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
        from lightning_gradwatch import SaturationCallback

        trainer = Trainer(callbacks=[SaturationCallback(threshold=0.5, margin=0.01)])
    """

    kinds = frozenset({"sigmoid", "tanh"})
    metric = "saturation"
    chart = "saturated outputs (fraction per layer)"
    alert_kind = AlertKind.SATURATION
    tally_keys = ("layers", "saturated", "totals", "kinds")

    def __init__(
        self,
        threshold: UnitFraction = 0.2,
        margin: OpenHalfUnit = 0.01,
        sample_every_n_steps: PositiveInt = 5,
        window: PositiveInt = 6,
        log_every_n_steps: PositiveInt | Null = None,
        layers: list[str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__(sample_every_n_steps, window, log_every_n_steps, layers, forward_fn)
        self.threshold = check_number("threshold", threshold, gt=0, le=1)
        self.margin = check_number("margin", margin, gt=0, lt=0.5)
        self._bounds = {kind: saturation_bound(kind, self.margin) for kind in self.kinds}
        self._names: list[str] = []
        # a ring of the last `window` samples: saturated counts per layer (device) and element counts (host: known
        # without a sync); the kinds each layer fed (host)
        self._saturated: Tensor | None = None
        self._totals: list[list[float]] = []
        self._kinds: list[set[str]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, margin=self.margin)

    @override
    def _layout(self, layers: list[Layer], device: torch.device) -> None:
        names = [layer.name for layer in layers]
        if self._saturated is not None and self._names == names:
            self._saturated = self._saturated.to(device)
            return
        self._names = names
        self._saturated = torch.zeros(self.window, len(layers), dtype=torch.float32, device=device)
        self._totals = [[0.0] * len(layers) for _ in range(self.window)]
        self._kinds = [set() for _ in layers]
        loaded = self._take_loaded(names)
        if loaded is not None and tuple(loaded["saturated"].shape) == tuple(self._saturated.shape):
            self._saturated.copy_(loaded["saturated"])
            self._totals = [[float(t) for t in row] for row in loaded["totals"]]
            self._kinds = [set(k) for k in loaded["kinds"]]

    @override
    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> tuple[Tensor, int]:
        return saturated_count(pre_activation, self._bounds[kind]), pre_activation.numel()

    @override
    def _accumulate(self, layer: int, kind: str, stat: tuple[Tensor, int]) -> None:
        assert self._saturated is not None
        count, numel = stat
        slot = self._samples % self.window
        self._saturated[slot, layer] += count
        self._totals[slot][layer] += float(numel)
        self._kinds[layer].add(kind)

    @override
    def _begin_sample(self) -> None:
        if self._saturated is not None:  # the slot this sample fills forgets the oldest sample
            slot = self._samples % self.window
            self._saturated[slot].zero_()
            self._totals[slot] = [0.0] * len(self._names)

    @override
    def _fractions(self, window: int) -> tuple[Tensor, Tensor]:
        assert self._saturated is not None
        device = self._saturated.device
        totals = torch.tensor([sum(column) for column in zip(*self._totals, strict=True)], dtype=torch.float32)
        summed = all_reduce_sum(torch.cat([self._saturated.sum(0), totals.to(device, non_blocking=True)]))
        n = len(self._names)
        saturated, total = summed[:n], summed[n:]
        return saturated / total.clamp_min(1.0), total > 0

    @override
    def _describe(self, layer: Layer, step: int, fraction: float, window: int) -> str:
        kinds = sorted(self._kinds[self._names.index(layer.name)]) or ["sigmoid", "tanh"]
        return (
            f"Saturated {' and '.join(kinds)} after '{layer.name}' at step {step}: {fraction:.0%} of its outputs lie "
            f"within {self.margin:g} of {' or '.join(_BOUNDS[k] for k in kinds)} over the last {window} sampled "
            f"batches (threshold {self.threshold:.0%}), where their gradient all but vanishes."
            + (
                " The first layer has been saturated since the first batches were measured: the inputs are probably "
                "not normalised (pixels in 0-255, raw physical units): scale them to [0, 1] or standardise them."
                if layer.name == self._names[0] and self._lowest.get(layer.name, 0.0) > self.threshold
                else ""
            )
        )

    @override
    def _layers_seen(self) -> bool:
        return any(self._kinds)

    @override
    def _tallies(self) -> dict[str, Any] | None:
        if self._saturated is None:
            return None
        return {
            "layers": list(self._names),
            "saturated": self._saturated.cpu(),
            "totals": [list(row) for row in self._totals],
            "kinds": [sorted(k) for k in self._kinds],
        }

    @override
    def _forget_layout(self) -> None:
        self._saturated, self._names = None, []
