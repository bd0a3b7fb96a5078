"""Update-to-weight ratios ``||delta w|| / ||w||`` per layer, for any optimizer, with no transfer of their own.

On the step before a logging step the weights are copied (one ``foreach`` copy, on the device); on the logging step
(before its own update) the copy is compared with the weights, which now hold the previous step's update, and the
copy is freed. The ratios ride in the logging step's one transfer. Read from the weights themselves, they are right
for every optimizer (fused, foreach, Adam's bias correction, weight decay, schedulers) and every parameter dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradwatch._params import OptimizerParams, ParamGroups, local_tensor
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch.functional.dynamics import snapshot_for_update, update_norms


class UpdateTracker:
    """One optimizer's weights before the step that precedes a logging step, and their ratios at that step."""

    def __init__(self) -> None:
        self._before: list[Tensor] | None = None
        self._index: OptimizerParams | None = None  # the parameters the copy is of

    def snapshot(self, step: StepGradients) -> None:
        """Copy the weights now, before this step's update (call on the step before a logging step)."""
        self._index = step.index
        self._before = snapshot_for_update([local_tensor(p.detach()) for p in step.params])

    def ratios(self, step: StepGradients, groups: ParamGroups) -> Tensor | None:
        """Per group of ``groups``: the previous step's update over the weights before it (0 for a group that did
        not move: frozen, or a skipped step); ``None`` without a copy. Frees the copy."""
        before, self._before = self._before, None
        if before is None or step.index is not self._index:
            return None  # the optimizer's parameters changed since the copy (a group added): no ratio this time
        delta, weight, after = update_norms(before, [local_tensor(p.detach()) for p in step.params], True)
        # over each parameter's sharded mesh dimensions, the three together (an identity unsharded)
        delta, weight, after = step.index.reduction.norms(torch.stack([delta, weight, after], 1), 2.0).unbind(1)
        delta, weight, after = (groups.combine(t, 2.0) for t in (delta, weight, after))
        weight = torch.where(weight > 0, weight, after)  # a zero-initialised layer: measured against its new weights
        return torch.where(
            weight > 0, delta / weight.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(delta)
        )
