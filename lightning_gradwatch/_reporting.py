"""What reaches the user: metrics (one row per logging step, one host transfer), alert lines, log directories.

Metrics of a step from every gradwatch callback are queued and sent to the Trainer's loggers in one
``log_metrics`` call, so a CSV gets one gradwatch row per logging step. Alert lines go through the
``lightning_gradwatch`` logger; when nothing is configured to show them they are printed through tqdm's ``write``,
which keeps them off the progress bar's line (Rich's live display takes the same stream above its bar).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch._compat import CSV_LOGGERS, TENSORBOARD_LOGGERS

log = logging.getLogger("lightning_gradwatch")
# Python's last-resort handler would print alert lines onto the progress bar's line; see print_alert
log.addHandler(logging.NullHandler())


def logger_step(trainer: pl.Trainer) -> int:
    """The step value Lightning's own loggers use for training metrics."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)  # private; Lightning has no public name for it


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning's own cadence (``log_every_n_steps``) logs the training step under way."""
    return bool(trainer._logger_connector.should_update_logs)  # private, as above


def host_values(*tensors: Tensor) -> list[list[float]]:
    """Bring several device tensors to the host in one transfer (one sync); returns each one flattened."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = [t.detach().reshape(-1).to(device, torch.float32) for t in tensors]
    values = torch.cat(flat).tolist()
    out, start = [], 0
    for t in flat:
        out.append(values[start : start + t.numel()])
        start += t.numel()
    return out


def host_scalars(*values: Tensor | float) -> list[float]:
    """Scalars as floats: the tensors among them brought to the host in one transfer, floats as they are (the
    CPU's host path keeps its statistics as floats)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    fetched = iter(host_values(*tensors)) if tensors else iter(())
    return [next(fetched)[0] if isinstance(v, Tensor) else float(v) for v in values]


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the Trainer's TensorBoard loggers (rank zero only; empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TENSORBOARD_LOGGERS)]


def log_dir(trainer: pl.Trainer) -> str:
    """The run's log directory (the version folder), found without ``trainer.log_dir`` (a collective), so rank zero
    can call it alone."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        if isinstance(logger, TENSORBOARD_LOGGERS + CSV_LOGGERS):
            return logger.log_dir
        if logger.save_dir is not None:
            return logger.save_dir
    return trainer.default_root_dir


# ------------------------------------------------------------------------------------------------ metrics
class MetricsRow:
    """The gradwatch metrics of one logging step, sent to every Lightning logger in one call (one per session)."""

    def __init__(self) -> None:
        self.step = -1
        self.values: dict[str, float] = {}

    def queue(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Queue host-side metrics for this logging step; a row left over from an earlier step is sent first."""
        if not metrics:
            return
        step = logger_step(trainer)
        if self.values and self.step != step:
            self.flush(trainer)
        self.step = step
        self.values.update(metrics)

    def flush(self, trainer: pl.Trainer) -> None:
        """Send the queued row to every Lightning logger, at Lightning's training step."""
        if not self.values:
            return
        values, self.values = self.values, {}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=self.step)


# ------------------------------------------------------------------------------------------------ alerts
def _shown(logger: logging.Logger, level: int) -> bool:
    """Whether a record at ``level`` reaches a real handler (not a NullHandler, not Python's last resort)."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) and level >= h.level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def print_line(text: str, level: int = logging.WARNING) -> None:
    """Log ``text`` through the ``lightning_gradwatch`` logger; if no handler shows it and it is a warning, print
    it on its own line through tqdm (above any progress bar) on stderr."""
    log.log(level, text)
    if level < logging.WARNING or not log.isEnabledFor(level) or _shown(log, level):
        return
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]  # Lightning's progress bar: installed, unstubbed

        tqdm.write(text, file=sys.stderr)
    except ImportError:  # tqdm comes with Lightning; this is only a fallback
        print(text, file=sys.stderr)
