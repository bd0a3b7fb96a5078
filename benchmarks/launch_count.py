"""The tensor operations each configuration issues per step that does not log: what a host-bound GPU step pays for.

On the H200 of benchmarks/RESULTS.md ("On a GPU") a step of the 110M GPT was bound by the host: each kernel launch
cost about 6 us in the CUDA runtime and 10 us or more with PyTorch's dispatch, so the preset's cost was its count of
small operations, not their arithmetic. This script counts them on a CPU, on the device path (the decisions a GPU
run takes on the device, as under ``lightning_gradwatch.testing.HostReadCounter``): ``torch.profiler`` with Python
stacks over a few steps, each top-level ``aten`` operation attributed to the innermost gradwatch frame that issued
it. The model's own operations, which the activation probe's TorchFunctionMode sees pass, are not counted.

    OMP_NUM_THREADS=1 python benchmarks/launch_count.py                        # the default configurations
    OMP_NUM_THREADS=1 python benchmarks/launch_count.py --configs adaptive_clipping --sites 15

The model is overhead.py's GPT with 12 blocks (148 parameter tensors, as the 110M one) at a tiny width.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402

from lightning_gradwatch.core import device_path  # noqa: E402

DEFAULT = "grad_watch_preset,nan_guard,adaptive_clipping,gradient_norm,loss_spike_guard,activations"
_PROBE_PASS = "activations/_probe.py"  # the activation mode's __torch_function__: the model's own calls pass there


class Profiled(Callback):
    """``torch.profiler`` with Python stacks over batches ``first`` .. ``first + count - 1``."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.profiler: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if args[-1] == self.first + self.count - 1:
            self.profiler.__exit__(None, None, None)


def attributed(events: Any) -> Counter[str]:
    """Top-level aten operations by the innermost gradwatch frame above them (the model's own ones left out)."""
    sites: Counter[str] = Counter()
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent, site = event.cpu_parent, None
        while parent is not None:
            if parent.name.startswith("aten::"):
                break  # not top-level: part of another operation
            if site is None and "lightning_gradwatch/" in parent.name:
                site = parent.name.split("lightning_gradwatch/")[-1]
            parent = parent.cpu_parent
        passing = site is not None and site.startswith(_PROBE_PASS) and site.endswith("__torch_function__")
        if parent is None and site is not None and not passing:
            sites[site] += 1
    return sites


def count(name: str, args: argparse.Namespace) -> Counter[str]:
    """Operations per step of configuration ``name``, by call site."""
    callbacks, trainer_kwargs, recipe = overhead.CONFIGS[name]()
    model = overhead.Bench("gpt", with_grad_norm_recipe=recipe, gpt_dims=args.gpt_dims)
    # the sample_every_n_steps=5 of the activation callbacks: a window of 5 steps holds one sampled step
    profiled = Profiled(first=10, count=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=args.precision,
        max_steps=16,
        log_every_n_steps=50,
        callbacks=[*callbacks, profiled],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(model, model.data(16, 2))
    sites = attributed(profiled.profiler.events())
    return Counter({site: n / profiled.count for site, n in sites.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--gpt-dims", default="12,32,4,200,16")
    parser.add_argument("--sites", type=int, default=0, help="print this many call sites per configuration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"\nmodel=gpt({args.gpt_dims}) precision={args.precision} torch={torch.__version__}\n")
    print("| configuration | tensor operations per non-logging step |")
    print("|---|---|")
    for name in args.configs.split(","):
        with device_path():  # the decisions a GPU run takes on the device, taken there on the CPU too
            sites = count(name, args)
        print(f"| {name} | {sum(sites.values()):.0f} |", flush=True)
        for site, n in sites.most_common(args.sites):
            print(f"|   {site} | {n:.1f} |")


if __name__ == "__main__":
    main()
