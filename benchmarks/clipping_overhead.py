"""Per-step cost of AdaptiveClipping against ``Trainer(gradient_clip_val=1.0)`` and no clipping.

All methods run interleaved in one process (round-robin, several rounds) so that machine noise hits them
alike; the step time is the median gap between consecutive ``on_train_batch_start`` calls, excluding the
first steps of each fit. ``--with-zclip`` adds the ``zclip`` package's Lightning callback (benchmark-only
environment, see ``clipping_quality.py``)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/clipping_overhead.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import AdaptiveClipping


class StepTimer(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


class Model(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(4096, 256, generator=g), torch.randint(0, 10, (4096,), generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, foreach=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=128, shuffle=True)


def step_time(method: str, steps: int, width: int, depth: int) -> float:
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    extra: dict[str, Any] = {}
    if method == "trainer_clip":
        extra["gradient_clip_val"] = 1.0
    elif method == "zclip":
        from zclip import ZClipLightningCallback

        callbacks.append(ZClipLightningCallback())
    elif method != "none":
        callbacks.append(AdaptiveClipping(mode=method))  # type: ignore[arg-type]
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **extra,
    )
    trainer.fit(Model(width, depth))
    gaps = [b - a for a, b in zip(timer.starts[5:], timer.starts[6:], strict=False)]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-zclip", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    methods = ["none", "trainer_clip", "zscore", "percentile", "agc"] + (["zclip"] if args.with_zclip else [])
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            times[m].append(step_time(m, args.steps, args.width, args.depth))
    params = sum(p.numel() for p in Model(args.width, args.depth).parameters())
    base = statistics.median(times["none"])
    clip = statistics.median(times["trainer_clip"])
    print(f"MLP {args.depth}x{args.width} ({params / 1e6:.1f}M params), batch 128, AdamW(foreach), 1 thread")
    print(f"median of {args.rounds} interleaved rounds of the median step time over {args.steps - 6} steps\n")
    print("| method | step time (ms) | vs none | vs Trainer(gradient_clip_val=1.0) |")
    print("|---|---|---|---|")
    for m in methods:
        t = statistics.median(times[m])
        print(f"| {m} | {1000 * t:.2f} | {100 * (t / base - 1):+.1f}% | {100 * (t / clip - 1):+.1f}% |")


if __name__ == "__main__":
    main()
