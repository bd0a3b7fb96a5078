"""SaturationCallback: sigmoid and tanh outputs stuck at their bounds."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradwatch._activations import ActivationCallback, Layer
from lightning_gradwatch._distributed import all_reduce_sum
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._types import OpenHalfUnit, PositiveInt, UnitFraction
from lightning_gradwatch._validation import check_number
from lightning_gradwatch.alerts import AlertKind, with_remedy
from lightning_gradwatch.functional.activations import saturated_count, saturation_bound

_BOUNDS = {"sigmoid": "0 or 1", "tanh": "-1 or 1"}


class SaturationCallback(ActivationCallback):
    r"""Log, per layer, the fraction of sigmoid and tanh outputs that are saturated, and alert when it is high.

    An output is saturated when it lies within ``margin`` of the function's bounds (sigmoid: 0 or 1; tanh: -1 or
    1), where its gradient all but vanishes. Sigmoid and tanh are seen however they are written - ``nn.Sigmoid``,
    ``nn.Tanh``, ``torch.sigmoid``, ``torch.tanh``, ``F.sigmoid``, ``F.tanh``, ``x.sigmoid()`` - and attributed to
    the Linear/Conv layer that fed them (also through a normalisation layer). Only hidden activations count: a
    sigmoid on the model's output (a binary classifier's probabilities, which may rightly sit near 0 or 1) is not
    saturation and is never reported. Out of reach, and therefore never
    reported: hard-sigmoid and hard-tanh (piecewise linear), and the gates inside fused recurrent layers
    (``nn.LSTM``, ``nn.GRU``), which run as single C++ kernels.

    The fraction is over a window of sampled training batches; under DDP the counts are summed across ranks once
    per check. Cost as for :class:`~lightning_gradwatch.DeadNeuronCallback`: nothing on unsampled steps, forward
    hooks and a TorchFunctionMode for the forward pass of sampled steps only, one transfer per check, on a
    logging step; inactive (one warning) when the model runs under ``torch.compile``.

    Logs ``gradwatch/saturation/{layer}``; alerts ``saturation`` naming the layer.

    Args:
        threshold: alert when a layer's saturated fraction exceeds this (0 < threshold <= 1).
        margin: how close to a bound counts as saturated (0 < margin < 0.5).
        sample_every_n_steps: sample the forward pass of every this many optimizer steps.
        window: sampled batches per check (checked at the next logging step).
        log_every_n_steps: check and log on every this many optimizer steps once the window is full; ``None``
            follows the Trainer's ``log_every_n_steps``.

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
        sample_every_n_steps: PositiveInt = 10,
        window: PositiveInt = 10,
        log_every_n_steps: PositiveInt | None = None,
    ) -> None:
        super().__init__(sample_every_n_steps, window, log_every_n_steps)
        self.threshold = check_number("threshold", threshold, gt=0, le=1)
        self.margin = check_number("margin", margin, gt=0, lt=0.5)
        self._bounds = {kind: saturation_bound(kind, self.margin) for kind in self.kinds}
        self._names: list[str] = []
        # per layer, this window: saturated count (device), element count and kinds seen (host: known without sync)
        self._saturated: Tensor | None = None
        self._totals: list[float] = []
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
        self._saturated = torch.zeros(len(layers), dtype=torch.float32, device=device)
        self._totals = [0.0] * len(layers)
        self._kinds = [set() for _ in layers]
        loaded = self._take_loaded(names)
        if loaded is not None:  # resume the window the checkpoint was in
            self._saturated.copy_(loaded["saturated"])
            self._totals = [float(t) for t in loaded["totals"]]
            self._kinds = [set(k) for k in loaded["kinds"]]

    @override
    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> tuple[Tensor, int]:
        return saturated_count(pre_activation, self._bounds[kind]), pre_activation.numel()

    @override
    def _accumulate(self, layer: int, kind: str, stat: tuple[Tensor, int]) -> None:
        assert self._saturated is not None
        count, numel = stat
        self._saturated[layer] += count
        self._totals[layer] += float(numel)
        self._kinds[layer].add(kind)

    @override
    def _check(self, trainer: pl.Trainer) -> None:
        assert self._saturated is not None
        n = len(self._names)
        device = self._saturated.device
        host = torch.tensor(
            self._totals + [float("sigmoid" in k) for k in self._kinds] + [float("tanh" in k) for k in self._kinds],
            dtype=torch.float32,
        ).to(device, non_blocking=True)
        reduced = all_reduce_sum(torch.cat([self._saturated, host]))  # one collective per check, same size everywhere
        (values,) = host_values(reduced)  # one transfer
        self._saturated.zero_()
        self._totals = [0.0] * n
        self._kinds = [set() for _ in range(n)]
        step, findings = trainer.global_step, []
        for i, name in enumerate(self._names):
            total = values[n + i]
            if total == 0:
                continue  # no hidden sigmoid/tanh after this layer in the window, on any rank
            kinds = [k for k, flag in (("sigmoid", values[2 * n + i]), ("tanh", values[3 * n + i])) if flag]
            kind = " and ".join(kinds)
            bounds = " or ".join(_BOUNDS[k] for k in kinds)
            fraction = values[i] / total
            message = with_remedy(
                AlertKind.SATURATION,
                f"Saturated {kind} after '{name}' at step {step}: {fraction:.0%} of its outputs lie within "
                f"{self.margin:g} of {bounds} over the last {self._batches_in_window} sampled batches (threshold "
                f"{self.threshold:.0%}), where their gradient all but vanishes.",
            )
            findings.append((name, fraction, message))
        self._report(trainer, findings)

    @override
    def _tallies(self) -> dict[str, Any] | None:
        if self._saturated is None:
            return None
        return {
            "layers": list(self._names),
            "saturated": self._saturated.cpu(),
            "totals": list(self._totals),
            "kinds": [sorted(k) for k in self._kinds],
        }

    @override
    def _forget_layout(self) -> None:
        self._saturated, self._names = None, []
