"""GradientsThroughTime on one task for RNN, GRU and LSTM: the horizons it measures, its pictures, and its cost.

The task (``tests/test_through_time.py``'s): the label is the first of 100 tokens, so only a memory reaching all the
way back can learn it. Each cell is trained with Adam at 1e-2 for ``--steps`` steps with ``GradientsThroughTime()``;
the table gives the loss and the horizon at each probe and the alerts. Then the cost, on the LSTM: fits with no
callback, with the callback probing only step 0 (what every other step costs) and with a probe every 10 steps,
interleaved, ``--rounds`` times; medians (and spread) of the time per step, and of the probe's own time::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/through_time.py [--steps 1000] [--rounds 5] [--pictures docs]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradwatch import GradientsThroughTime, GradWatch
from tests.recurrent_models import FirstToken


class Recorded(GradientsThroughTime):
    """Keeps, per probe, the loss median and the horizon the callback judged on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[tuple[int, float | None, int]] = []
        self.seconds: list[float] = []

    def _report(self, trainer: pl.Trainer, readings: list[Any], loss: Any, seconds: float) -> None:
        self.rows.append((trainer.global_step - 1, loss.median, readings[0].horizon))
        self.seconds.append(seconds)
        super()._report(trainer, readings, loss, seconds)


def fit(model: pl.LightningModule, callbacks: list[Any], steps: int, root: str) -> float:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(root, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    started = time.perf_counter()
    trainer.fit(model)
    return time.perf_counter() - started


def horizons(steps: int, pictures: Path | None) -> None:
    print("| cell | probe step: horizon / loss (median of 50 steps) | alerts |\n|---|---|---|")
    for cell, every in (("rnn", 100), ("gru", 100), ("lstm", 100), ("lstm", 10)):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            watch = Recorded(every_n_steps=every, pictures=pictures is not None and every == 100)
            fit(FirstToken(cell), [watch], steps, tmp)
            if pictures is not None and every == 100:
                watch._report_pictures(None, str(pictures))  # type: ignore[arg-type]
                (pictures / "gradients_through_time.png").rename(pictures / f"through_time_{cell}.png")
        rows = [(s, v, h) for s, v, h in watch.rows if s % 100 == 0]
        row = " ".join(f"{s}: {h} / {'-' if v is None else f'{v:.3f}'}" for s, v, h in rows)
        alerts = "; ".join(f"{a.kind} @{a.step} (horizon {a.value:g})" for a in watch.alerts) or "none"
        print(f"| {cell}{'' if every == 100 else f' (probed every {every} steps)'} | {row} | {alerts} |")


def cost(steps: int, rounds: int) -> None:
    configs = {
        "none": lambda: [],
        "GradientsThroughTime, step 0 only": lambda: [GradientsThroughTime(every_n_steps=10**9, pictures=False)],
        "GradientsThroughTime, every 10 steps": lambda: [Recorded(every_n_steps=10, pictures=False)],
        "GradWatch()": lambda: [GradWatch()],
        "GradWatch() + GradientsThroughTime, step 0 only": lambda: [
            GradWatch(),
            GradientsThroughTime(every_n_steps=10**9, pictures=False),
        ],
    }
    per_step: dict[str, list[float]] = {name: [] for name in configs}
    probes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, make in configs.items():  # interleaved: the machine's drift hits every config alike
                callbacks = make()
                per_step[name].append(fit(FirstToken("lstm"), callbacks, steps, tmp) / steps)
                probes += [s for cb in callbacks if isinstance(cb, Recorded) for s in cb.seconds[1:]]
    base = statistics.median(per_step["none"])
    print("\n| config | ms per step, median (min-max) | ratio to none |\n|---|---|---|")
    for name, values in per_step.items():
        lo, hi = min(values), max(values)
        print(
            f"| {name} | {1e3 * statistics.median(values):.2f} ({1e3 * lo:.2f}-{1e3 * hi:.2f}) | "
            f"{statistics.median(values) / base:.3f}x |"
        )
    print(
        f"\nprobe of one LSTM (16 sequences of 100 steps): median {1e3 * statistics.median(probes):.2f} ms "
        f"(min {1e3 * min(probes):.2f}, max {1e3 * max(probes):.2f}; {len(probes)} probes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cost-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pictures", type=Path, default=None, help="save each cell's profile picture here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    horizons(args.steps, args.pictures)
    cost(args.cost_steps, args.rounds)


if __name__ == "__main__":
    main()
