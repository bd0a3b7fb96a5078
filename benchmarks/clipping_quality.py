"""Quality of AdaptiveClipping against no clipping, static clipping and ZClip: spike damage and clean cost.

Two experiments on a small MLP (32-128-128-10, ReLU) learning a random non-linear teacher, with SGD+momentum
and with Adam, several seeds, real ``Trainer.fit`` runs on CPU:

- spike damage: one batch (at ``--spike-step``) has its inputs scaled x1000. Damage = mean training loss over
  the following 60 steps minus that of the same method's unspiked run (same seed, same batches). The target:
  at most 5% of the damage an unclipped run takes.
- clean cost: final held-out loss of an unspiked run relative to no clipping. The target: within 2%.

Methods: ``none``; ``static`` (``Trainer(gradient_clip_val=1.0)``); ``zclip`` (the ``zclip`` package's
Lightning callback with its published defaults; only with ``--with-zclip``); ``zscore``, ``percentile`` and
``agc`` (``AdaptiveClipping(mode=...)`` with its defaults).

ZClip is never a dependency of lightning-gradwatch. To include it, use a separate benchmark-only environment::

    python3 -m venv /tmp/zclip-venv
    /tmp/zclip-venv/bin/pip install torch==2.13.0 lightning==2.6.6 tensorboard zclip==1.0.0
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD /tmp/zclip-venv/bin/python benchmarks/clipping_quality.py --with-zclip

Without ``--with-zclip`` the script runs in the project's own environment and skips ZClip.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import AdaptiveClipping

IN, HIDDEN, CLASSES = 32, 128, 10
AFTER_SPIKE = 60


def make_data(task: str, n: int, seed: int) -> TensorDataset:
    """Inputs from N(0, 1); targets from a fixed random teacher (the same for every seed).

    ``regression``: a ReLU teacher the student can represent, targets scaled to std 3 (gradient norms 2-12,
    so clipping at 1.0 is active all along). ``classification``: a tanh teacher's argmax over 10 classes
    (gradient norms 0.3-1, so clipping at 1.0 rarely acts).
    """
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    if task == "classification":
        w1 = torch.randn(IN, 64, generator=gen) / IN**0.5
        w2 = torch.randn(64, CLASSES, generator=gen) / 8
        return TensorDataset(x, (torch.tanh(x @ w1 * 2) @ w2).argmax(dim=1))
    w1, b1 = torch.randn(IN, 32, generator=gen) / IN**0.5, torch.randn(32, generator=gen)
    w2 = torch.randn(32, 1, generator=gen) / 32**0.5
    y = torch.relu(x @ w1 + b1) @ w2
    return TensorDataset(x, y * (3.0 / _TEACHER_STD))


_TEACHER_STD = 0.6241  # std of the regression teacher's outputs over N(0, 1) inputs (measured once, fixed)


class Student(pl.LightningModule):
    def __init__(self, task: str, optimizer: str, spike_step: int | None, data_seed: int) -> None:
        super().__init__()
        self.task = task
        self.net = nn.Sequential(
            nn.Linear(IN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES if task == "classification" else 1),
        )
        self.optimizer_name = optimizer
        self.spike_step = spike_step
        self.train_data = make_data(task, 8192, data_seed)
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.spike_step:
            x = x * 1000.0  # the outlier batch
        loss = self.loss(self.net(x), y)
        self.losses.append(loss.detach())
        return loss

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) if self.task == "classification" else F.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05 if self.task == "classification" else 0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(7))


def make_callbacks(method: str) -> tuple[list[pl.Callback], dict[str, Any]]:
    if method == "none":
        return [], {}
    if method == "static":
        return [], {"gradient_clip_val": 1.0}
    if method == "zclip":
        from zclip import ZClipLightningCallback  # benchmark-only environment

        return [ZClipLightningCallback()], {}  # published defaults: alpha=0.97, z_thresh=2.5, max_grad_norm=1.0
    if method.startswith("adaptive_"):  # adaptive_<mode>[:arg=value:...] (defaults unless given)
        mode, *overrides = method.removeprefix("adaptive_").split(":")
        kwargs = {k: float(v) for k, v in (o.split("=") for o in overrides)}
        return [AdaptiveClipping(mode=mode, **kwargs)], {}  # type: ignore[arg-type]
    raise ValueError(method)


def run(
    task: str, method: str, optimizer: str, seed: int, spike_step: int | None, steps: int, heldout: TensorDataset
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = Student(task, optimizer, spike_step, data_seed=seed)
    callbacks, extra = make_callbacks(method)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **extra,
    )
    trainer.fit(model)
    losses = torch.stack(model.losses).tolist()
    with torch.no_grad():
        x, y = heldout.tensors
        final = model.loss(model.net(x), y).item()
    out: dict[str, Any] = {"losses": losses, "heldout": final}
    for cb in callbacks:
        if isinstance(cb, AdaptiveClipping):
            stats = cb._stats[0]
            out["clipped_fraction"] = float(stats.total_clipped) / max(float(stats.total_steps), 1.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-zclip", action="store_true", help="include ZClip (benchmark-only environment)")
    parser.add_argument("--task", choices=["regression", "classification"], default="regression")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--spike-step", type=int, default=150)
    parser.add_argument("--optimizers", default="sgd,adam")
    parser.add_argument("--methods", default="none,static,zclip,adaptive_zscore,adaptive_percentile,adaptive_agc")
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_gradwatch").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    methods = [m for m in args.methods.split(",") if m != "zclip" or args.with_zclip]
    heldout = make_data(args.task, 4096, seed=10_000)
    window = slice(args.spike_step + 1, args.spike_step + 1 + AFTER_SPIKE)
    results: dict[str, Any] = {}
    start = time.time()
    for opt in args.optimizers.split(","):
        for method in methods:
            for seed in range(args.seeds):
                for spiked in (False, True):
                    r = run(args.task, method, opt, seed, args.spike_step if spiked else None, args.steps, heldout)
                    results[f"{opt}/{method}/{seed}/{int(spiked)}"] = r
            print(f"{opt:5s} {method:20s} done ({time.time() - start:.0f}s)", file=sys.stderr)

    def after(opt: str, method: str, seed: int, spiked: int) -> float:
        return statistics.fmean(results[f"{opt}/{method}/{seed}/{spiked}"]["losses"][window])

    print(
        f"\ntask={args.task} steps={args.steps} spike_step={args.spike_step} seeds={args.seeds} window=steps {window.start}-{window.stop - 1}\n"
    )

    def pct(value: float, of: float) -> str:
        return f"{100 * value / of:+.1f}%" if math.isfinite(value / of) else "n/a"

    for opt in args.optimizers.split(","):
        seeds = range(args.seeds)
        gap = statistics.fmean(after(opt, "none", s, 1) - after(opt, "none", s, 0) for s in seeds)
        clean_window = statistics.fmean(after(opt, "none", s, 0) for s in seeds)
        base_heldout = statistics.fmean(results[f"{opt}/none/{s}/0"]["heldout"] for s in seeds)
        what = f"{gap:.4f}" if math.isfinite(gap) else "diverged (NaN loss)"
        print(f"### {opt}: unclipped spike damage (the gap) = {what}; clean loss over the window {clean_window:.4f}\n")
        print(
            "| method | spike damage (vs own clean run) | % of gap | damage vs unclipped clean run | % of gap "
            "| % of clean window loss | clean held-out loss | clean cost vs none | steps clipped (clean) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for method in methods:
            damage = statistics.fmean(after(opt, method, s, 1) - after(opt, method, s, 0) for s in seeds)
            damage_abs = statistics.fmean(after(opt, method, s, 1) - after(opt, "none", s, 0) for s in seeds)
            held = statistics.fmean(results[f"{opt}/{method}/{s}/0"]["heldout"] for s in seeds)
            fractions = [results[f"{opt}/{method}/{s}/0"].get("clipped_fraction") for s in seeds]
            frac = f"{100 * statistics.fmean(fractions):.1f}%" if fractions[0] is not None else "-"
            print(
                f"| {method} | {damage:+.4f} | {pct(damage, gap)} | {damage_abs:+.4f} | {pct(damage_abs, gap)} "
                f"| {pct(damage, clean_window)} | {held:.4f} | {pct(held - base_heldout, base_heldout)} | {frac} |"
            )
        print()
    print(f"total time {time.time() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in results.items()}, f)


if __name__ == "__main__":
    main()
