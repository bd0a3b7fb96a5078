"""The logging intervals of GradientNormLogger: per optimizer, what the steps between two logging steps did (the
peak global norm and its step, each layer's last step with a non-zero gradient), kept on the device and saved with
the checkpoint so that an explosion just before a save is still reported after resuming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lightning_gradwatch.gradients._gradient_rules import IntervalTally


class NormIntervals:
    """The current interval's :class:`IntervalTally` per optimizer suffix, with the layers it counts."""

    def __init__(self) -> None:
        self._tallies: dict[str, IntervalTally] = {}
        self._layers: dict[str, list[str]] = {}  # the layers each tally counts, in order
        self._loaded: dict[str, dict[str, Any]] = {}  # a checkpoint's unfinished intervals, until a step takes them

    def start(self) -> None:
        """A new fit: every interval starts afresh (a checkpoint's, loaded before, is still taken up)."""
        self._tallies.clear()
        self._layers.clear()

    def for_step(self, suffix: str, names: list[str], device: torch.device, on_host: bool) -> IntervalTally:
        """The tally this step folds into: made when the optimizer's layers change (a group added mid-run: each
        layer keeps its last non-zero step by name), or taken from the checkpoint when it counts the same layers."""
        tally = self._tallies.get(suffix)
        if tally is not None and self._layers.get(suffix) == names and tally.on_host == on_host:
            return tally
        last = None
        if tally is not None:
            known = dict(zip(self._layers.get(suffix, []), tally.last_nonzero_steps(), strict=True))
            last = [known.get(n, -1.0) for n in names]
        tally = IntervalTally.zeros(len(names), device, last, on_host)
        loaded = self._loaded.pop(suffix, None)
        if loaded is not None and loaded.get("layers") == names:
            tally = IntervalTally.restored(loaded, device, on_host)
        self._tallies[suffix], self._layers[suffix] = tally, list(names)
        return tally

    def restart(self, suffix: str, device: torch.device) -> IntervalTally:
        """A logging step closed ``suffix``'s interval: the next one starts, with the layers' last non-zero steps."""
        old = self._tallies[suffix]
        self._tallies[suffix] = IntervalTally.zeros(old.layers, device, old.last_nonzero, old.on_host)
        return old

    def unfinished(self) -> Iterator[tuple[str, float, int]]:
        """``(suffix, peak global norm, its step)`` of each interval still open (on the host: one read each)."""
        for suffix, tally in self._tallies.items():
            peak, peak_step = (float(v) for v in tally.tensors(torch.device("cpu"))[:2])
            yield suffix, peak, int(peak_step)

    def state(self) -> dict[str, dict[str, Any]]:
        """The open intervals, for a checkpoint, with any loaded interval no step has taken up yet (a checkpoint
        saved again before the first step after resuming)."""
        intervals = {suffix: dict(loaded) for suffix, loaded in self._loaded.items()}
        for suffix, tally in self._tallies.items():
            intervals[suffix] = {"layers": list(self._layers.get(suffix, [])), **tally.state()}
        return intervals

    def load(self, intervals: dict[str, Any]) -> None:
        """Keep a checkpoint's open intervals until a step of the same optimizer and layers takes them."""
        self._loaded = {str(k): dict(v) for k, v in intervals.items()}
        self._tallies.clear()

    def forget_loaded(self) -> None:
        self._loaded = {}
