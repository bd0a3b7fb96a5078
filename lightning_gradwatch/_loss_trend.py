"""The training loss of the sampled batches, as evidence for the activation verdicts.

Units that die (or saturate) while the loss keeps falling are usually a layer shedding capacity the task does not
need: the ReLU head of a DistilBERT classifier over a nearly constant [CLS] vector, the top encoder layer of a VAE
whose KL term rewards passing less. Units that die in a blow-up, a learning-rate spike or a collapse leave the loss
stuck or worse. :class:`SampledLoss` keeps the losses of the last ``window`` sampled batches on the device, with no
sync: their median (robust to the one exploding batch that often comes before a collapse) rides on the activation
callbacks' verdict read, averaged over ranks.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch._distributed import all_reduce_sum
from lightning_gradwatch._precision import unscaled_loss

#: The loss improved when it is below its reference by more than this fraction of the reference's magnitude: the
#: reference is the best window median so far, biased low by noise, so a flat loss does not pass for an improving one.
IMPROVEMENT = 0.02


class SampledLoss:
    """A ring of the last ``window`` sampled batches' losses (unscaled under fp16; NaN while empty or non-finite)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._ring: Tensor | None = None

    def record(self, trainer: pl.Trainer, sample: int, loss: Tensor) -> None:
        """Keep ``loss`` (the loss of sampled batch number ``sample``) in its slot of the ring."""
        value = unscaled_loss(trainer, loss)
        if self._ring is None or self._ring.device != value.device:
            self._ring = torch.full((self.window,), math.nan, device=value.device)
        self._ring[sample % self.window] = torch.where(torch.isfinite(value), value, math.nan)

    def reduced_parts(self, device: torch.device) -> Tensor:
        """``[sum, count]`` over ranks of the median of each rank's finite losses in the ring (a collective, like
        the verdict's): a rank without one adds nothing."""
        if self._ring is None:
            parts = torch.zeros(2, device=device)
        else:
            median = torch.nanmedian(self._ring)
            known = torch.isfinite(median)
            parts = torch.stack([torch.where(known, median, 0.0), known.float()]).to(device)
        return all_reduce_sum(parts)


def window_loss(total: float, count: float) -> float:
    """The window's loss from the parts :meth:`SampledLoss.reduced_parts` read back, or NaN without one."""
    return total / count if count > 0 else math.nan


def improved(loss: float, reference: float) -> bool:
    """Whether ``loss`` is clearly below ``reference`` (False when either is unknown)."""
    if not (math.isfinite(loss) and math.isfinite(reference)):
        return False
    return loss < reference - IMPROVEMENT * abs(reference)
