"""Both Lightning namespaces: the unified ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

The callbacks subclass ``lightning.pytorch``'s ``Callback`` and run under either Trainer; every ``isinstance`` check
on a Lightning class (loggers, strategies, progress bars) goes through the tuples here, which hold the class from
each namespace that is installed, so a ``pytorch_lightning.Trainer`` gets every feature too.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def lightning_classes(module: str, name: str) -> tuple[type[Any], ...]:
    """The class ``name`` of ``<namespace>.<module>`` from every installed namespace that has it."""
    found: list[type[Any]] = []
    for namespace in _NAMESPACES:
        try:
            cls = getattr(importlib.import_module(f"{namespace}.{module}"), name)
        except (ImportError, AttributeError):  # namespace not installed, or a version without this class
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


TENSORBOARD_LOGGERS = lightning_classes("loggers", "TensorBoardLogger")
CSV_LOGGERS = lightning_classes("loggers", "CSVLogger")
#: Strategies whose gradients are sharded across ranks (norms need a reduction). ``ModelParallelStrategy`` only
#: exists from lightning 2.4 on.
SHARDED_STRATEGIES = lightning_classes("strategies", "FSDPStrategy") + lightning_classes(
    "strategies", "ModelParallelStrategy"
)
TQDM_PROGRESS_BARS = lightning_classes("callbacks", "TQDMProgressBar")
RICH_PROGRESS_BARS = lightning_classes("callbacks", "RichProgressBar")
