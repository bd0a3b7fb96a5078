"""The batches LossSpikeGuard drops on a rerun: those a ``gradwatch_spikes.json`` lists, found by the fingerprint of
their first tensor wherever they come (a shuffled or resumed loader), or by ``(epoch, batch_idx)`` for a file
written without fingerprints."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gradwatch._distributed import distributed
from lightning_gradwatch._step import host_is_free
from lightning_gradwatch.functional.spikes import batch_fingerprint, fingerprint_probe, same_fingerprint

SPIKES_FILE = "gradwatch_spikes.json"


class SkipList:
    """The batches to drop, and the fingerprints of batches.

    Args:
        path: a ``gradwatch_spikes.json`` from an earlier run, or ``None`` for none.

    Raises:
        ValueError: ``path`` is not a path, or not a readable spikes file.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.positions, self.prints = load_batches(path)
        self._prints_on: tuple[torch.device, Tensor] | None = None
        self._probes: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    @property
    def listed(self) -> set[tuple[int, int]]:
        """Every batch listed, as ``(epoch, batch_idx)`` where it was recorded."""
        return self.positions | {(e, i) for e, i, _ in self.prints}

    def fingerprint(self, tensor: Tensor) -> Tensor | float:
        """The fingerprint of a batch's first tensor: a float where the host reads it for free (one CPU process),
        else a device scalar."""
        key = (tensor.numel(), tensor.device)
        probe = self._probes.get(key)
        if probe is None:
            if len(self._probes) > 8:  # batch shapes vary (the last batch, bucketing): keep the cache small
                self._probes.clear()
            probe = self._probes[key] = fingerprint_probe(tensor.numel(), tensor.device)
        value = batch_fingerprint(tensor, *probe)
        return float(value) if host_is_free(tensor.device) and not distributed() else value

    def matches(self, fingerprint: Tensor | float) -> Tensor | bool:
        """Whether ``fingerprint`` is a listed batch's: a device flag for a device fingerprint (no sync)."""
        if isinstance(fingerprint, Tensor):
            return same_fingerprint(fingerprint, self._prints_tensor(fingerprint.device))
        return any(same_fingerprint(fingerprint, p) for *_, p in self.prints)

    def _prints_tensor(self, device: torch.device) -> Tensor:
        if self._prints_on is None or self._prints_on[0] != device:
            values = torch.tensor([p for *_, p in self.prints], dtype=torch.float32, device=device)
            self._prints_on = (device, values)
        return self._prints_on[1]

    def epoch_replayed_from_start(self, trainer: pl.Trainer, batch_idx: int) -> int:
        """At the fit's first batch: the epoch whose positions are off (-1 if none). Resumed mid-epoch, a loader that
        cannot resume (no ``state_dict``) replays the epoch's data from its start while ``batch_idx`` goes on: a
        batch listed by position only (a file without fingerprints) would name another one there."""
        loader = getattr(trainer.fit_loop, "_combined_loader", None)
        loaders = list(getattr(loader, "flattened", None) or [])
        resumable = bool(loaders) and all(hasattr(d, "state_dict") and hasattr(d, "load_state_dict") for d in loaders)
        if batch_idx == 0 or resumable:
            return -1
        epoch = trainer.current_epoch
        if any(e == epoch for e, _ in self.positions):
            rank_zero_warn(
                f"LossSpikeGuard resumed mid-epoch (at batch {batch_idx} of epoch {epoch}) with a DataLoader that "
                "cannot resume: the epoch's data start again from its first batch while batch_idx goes on, so the "
                f"batches skip_batches lists by position only in epoch {epoch} name other batches there; they are not "
                "dropped in this epoch (files written now carry a fingerprint of each batch, found wherever it comes)."
            )
        return epoch


def load_batches(
    path: str | os.PathLike[str] | None,
) -> tuple[set[tuple[int, int]], list[tuple[int, int, float]]]:
    """The batches a ``gradwatch_spikes.json`` lists: by fingerprint where it has one, else by (epoch, batch_idx)."""
    if path is None:
        return set(), []
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`skip_batches` must be a path to a gradwatch_spikes.json or None, got {path!r}.")
    try:
        with open(path) as f:
            spikes = json.load(f)["spikes"]
        positions = {(int(s["epoch"]), int(s["batch_idx"])) for s in spikes if s.get("fingerprint") is None}
        prints = [
            (int(s["epoch"]), int(s["batch_idx"]), float(s["fingerprint"]))
            for s in spikes
            if s.get("fingerprint") is not None
        ]
        return positions, prints
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"`skip_batches` must be a readable gradwatch_spikes.json, got {path!r}: {err}") from err


def write_spikes(directory: str, spikes: list[dict[str, Any]]) -> None:
    """Write the spikes found (``skip_batches`` of a rerun reads them) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SPIKES_FILE), "w") as f:
        json.dump({"spikes": spikes}, f, indent=2)


def first_tensor(batch: Any) -> Tensor | None:
    """The batch's first non-empty tensor (inputs come first in a tuple, a list or a dict), or ``None``."""
    if isinstance(batch, Tensor):
        return batch if batch.numel() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None
