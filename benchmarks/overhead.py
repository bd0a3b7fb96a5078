"""Per-step overhead of gradwatch callbacks against no callback, measured side by side in one process.

Each round fits one short run per configuration, in a rotating order, and takes each run's step cost: the median
of its ordinary steps plus its logging steps' excess spread over all steps (warm-up dropped), so that a stall of a
shared machine does not pass for overhead while the cost of logging steps still counts; the ratio to the no-callback run of the same round is taken, and the median ratio over
rounds is reported. Step time is measured between on_train_batch_start and on_train_batch_end, so data loading
and Trainer start-up are excluded.

The last column counts the host-device syncs each configuration adds on steps that do not log, in one more
untimed fit per configuration: on a GPU with ``torch.cuda.set_sync_debug_mode``; on a CPU with
lightning_gradwatch/testing.py (every host read of a device tensor, seen through ``__torch_function__``).

    python benchmarks/overhead.py                       # CPU, MLP, all configurations
    python benchmarks/overhead.py --device cuda --model gpt --precision bf16-mixed   # a GPT-style model on a GPU
    python benchmarks/overhead.py --configs none,gradient_norm,clip_1.0
    python benchmarks/overhead.py --model cnn --configs none,dead_neurons,saturation,activations --batch-size 64
    python benchmarks/overhead.py --configs none,clip_1.0,adaptive_clipping,zclip   # in the zclip environment
    python benchmarks/overhead.py --accumulate-grad-batches 4 --configs none,noise_scale,noise_scale_every_step
    python benchmarks/overhead.py --compile inductor --configs none,activations,grad_watch_preset   # torch.compile

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_gradwatch as gw
from lightning_gradwatch.testing import HostReadCounter


class StepTimer(Callback):
    """Per-step time: wall clock, or with ``cpu=True`` the main thread's CPU time (robust on a shared machine,
    exact when torch runs on one thread)."""

    def __init__(self, cpu: bool = False) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._clock = time.thread_time if cpu else time.perf_counter

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = self._clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(self._clock() - self._start)


class CudaSyncCounter(Callback):
    """Counts the host-device syncs of each non-logging training step with ``torch.cuda.set_sync_debug_mode``
    (every sync raises a warning, caught and counted here), keyed by the step."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self._caught: Any = None
        self._records: list[Any] = []
        self._step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer._logger_connector.should_update_logs:
            return
        self._step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        self._caught = None
        self.per_step[self._step] = sum("synchroniz" in str(r.message) for r in self._records)


class RandomTokens(Dataset):
    def __init__(self, n: int, shape: tuple[int, ...], vocab: int | None) -> None:
        self.n, self.shape, self.vocab = n, shape, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        g = torch.Generator().manual_seed(i)
        if self.vocab:
            return torch.randint(0, self.vocab, self.shape, generator=g)
        return torch.randn(self.shape, generator=g), torch.randint(0, 10, (), generator=g)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


GPT_DIMS = "12,768,12,32000,512"  # layers, width, heads, vocab, sequence


class Bench(pl.LightningModule):
    def __init__(self, model: str, with_grad_norm_recipe: bool = False, gpt_dims: str = GPT_DIMS) -> None:
        super().__init__()
        self.kind = model
        self.with_grad_norm_recipe = with_grad_norm_recipe
        if model == "gpt":
            layers, d, heads, self.vocab, self.seq = (int(v) for v in gpt_dims.split(","))
            self.embed = nn.Embedding(self.vocab, d)
            self.pos = nn.Parameter(torch.zeros(self.seq, d))
            self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, self.vocab, bias=False)
            self.head.weight = self.embed.weight  # tied, as in GPT-2: ~110M parameters at the default dims
        elif model == "cnn":  # a small ResNet with functional ReLU after conv -> bn (what the dead-unit probe watches)
            self.vocab = None
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
            self.blocks = nn.ModuleList(
                nn.ModuleList(
                    [m for _ in range(2) for m in (nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))]
                )
                for _ in range(4)
            )
            self.fc = nn.Linear(32, 10)
        else:
            self.vocab = None
            self.net = nn.Sequential(
                nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (gpt: ``x`` is the input tokens); what the probes call under ``--compile``."""
        if self.kind == "gpt":
            h = self.embed(x) + self.pos[: x.shape[1]]
            return self.head(self.ln(self.blocks(h)))
        if self.kind == "cnn":
            h = F.relu(self.stem(x))
            for conv1, bn1, conv2, bn2 in self.blocks:
                out = F.relu(bn1(conv1(h)))  # conv -> bn -> relu: attributed to the conv
                h = F.relu(h + bn2(conv2(out)))  # residual sum: not attributed
            return self.fc(h.mean(dim=(2, 3)))
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.kind == "gpt":
            logits = self(batch[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.with_grad_norm_recipe:  # Lightning's documented recipe: self.log_dict(grad_norm(self, norm_type=2))
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, foreach=True)

    def data(self, steps: int, batch: int) -> DataLoader:
        shape = (self.seq,) if self.kind == "gpt" else (3, 16, 16) if self.kind == "cnn" else (256,)
        return DataLoader(RandomTokens(steps * batch, shape, self.vocab), batch_size=batch, num_workers=0)


def _zclip() -> list[Callback]:
    from zclip import ZClipLightningCallback  # benchmark-only environment: see benchmarks/RESULTS.md

    return [ZClipLightningCallback()]


# name -> (callbacks, extra Trainer arguments, use Lightning's grad_norm recipe)
CONFIGS: dict[str, Callable[[], tuple[list[Callback], dict[str, Any], bool]]] = {
    "none": lambda: ([], {}, False),
    "gradient_norm": lambda: ([gw.GradientNormLogger()], {}, False),
    "gradient_norm_every_step": lambda: ([gw.GradientNormLogger(log_every_n_steps=1)], {}, False),
    # every layer charted (no budget): against gradient_norm_every_step, the cost of charting per block on a deep model
    "gradient_norm_every_step_all_layers": lambda: (
        [gw.GradientNormLogger(log_every_n_steps=1, max_series=None)],
        {},
        False,
    ),
    "lightning_grad_norm_recipe": lambda: ([], {}, True),
    "dead_neurons": lambda: ([gw.DeadNeuronCallback()], {}, False),
    "saturation": lambda: ([gw.SaturationCallback()], {}, False),
    "activations": lambda: ([gw.DeadNeuronCallback(), gw.SaturationCallback()], {}, False),  # one shared probe
    "nan_guard": lambda: ([gw.NaNGuard()], {}, False),
    "nan_guard_rollback": lambda: ([gw.NaNGuard(action="rollback")], {}, False),
    "loss_spike_guard": lambda: ([gw.LossSpikeGuard()], {}, False),
    "loss_spike_guard_skip": lambda: ([gw.LossSpikeGuard(action="skip")], {}, False),
    "clip_1.0": lambda: ([], {"gradient_clip_val": 1.0}, False),
    "adaptive_clipping": lambda: ([gw.AdaptiveClipping()], {}, False),
    "adaptive_percentile": lambda: ([gw.AdaptiveClipping(mode="percentile")], {}, False),
    "adaptive_agc": lambda: ([gw.AdaptiveClipping(mode="agc")], {}, False),
    "grad_watch_preset": lambda: ([gw.GradWatch(report=False)], {}, False),
    # needs two batch sizes: run with --accumulate-grad-batches > 1 (else it idles, with a warning)
    "noise_scale": lambda: ([gw.GradientNoiseScale()], {}, False),
    "noise_scale_every_step": lambda: ([gw.GradientNoiseScale(log_every_n_steps=1)], {}, False),
    "zclip": lambda: (_zclip(), {}, False),
}
DEFAULT_CONFIGS = [
    name for name in CONFIGS if name != "zclip" and not name.startswith("noise_scale") and "all_layers" not in name
]


def make_fit(
    name: str, args: argparse.Namespace, extra: list[Callback], run_name: str
) -> tuple[pl.Trainer, Bench, DataLoader]:
    """The Trainer, model and data of one fit of configuration ``name``, with ``extra`` callbacks last."""
    callbacks, trainer_kwargs, recipe = CONFIGS[name]()
    model = Bench(args.model, with_grad_norm_recipe=recipe, gpt_dims=args.gpt_dims)
    # the model's layers compiled, as a user does (training_step, which logs, stays eager)
    if getattr(args, "compile", None):
        torch._dynamo.reset()  # each fit compiles afresh: never past dynamo's cache limit into eager code
        for name in ("net", "blocks", "stem"):
            if hasattr(model, name) and not isinstance(getattr(model, name), nn.ModuleList):
                setattr(model, name, torch.compile(getattr(model, name), backend=args.compile))
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        log_every_n_steps=args.log_every_n_steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        callbacks=[*callbacks, *extra],
        logger=pl.loggers.TensorBoardLogger(args.logdir, name=run_name),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    return trainer, model, model.data(args.steps * args.accumulate_grad_batches, args.batch_size)


def run_once(name: str, args: argparse.Namespace) -> float:
    """One timed fit of configuration ``name``: its step cost."""
    timer = StepTimer(cpu=args.clock == "cpu")
    trainer, model, data = make_fit(name, args, [timer], name)
    trainer.fit(model, data)
    accumulate = args.accumulate_grad_batches  # the timer sees micro-batches: add up each optimizer step's
    times = [sum(timer.times[i : i + accumulate]) for i in range(0, len(timer.times), accumulate)]
    return step_cost(times, args.warmup, args.log_every_n_steps)


def syncs_added(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """The host-device syncs each configuration adds per non-logging step against ``none``, from one untimed
    fit each (counting slows a step, so it never runs during a timed fit): on CUDA counted with
    ``torch.cuda.set_sync_debug_mode``; on CPU, where there is no sync to see, the host reads that would be one,
    counted by lightning_gradwatch/testing.py."""
    per_step: dict[str, dict[int, int]] = {}
    for name in names:
        if args.device == "cuda":
            cuda_counter = CudaSyncCounter()
            trainer, model, data = make_fit(name, args, [cuda_counter], f"{name}_counted")
            trainer.fit(model, data)
            per_step[name] = cuda_counter.per_step
            continue
        counter = HostReadCounter()
        trainer, model, data = make_fit(name, args, [counter.callback()], f"{name}_counted")
        with counter:
            trainer.fit(model, data)
        per_step[name] = {s: n for s, n in counter.per_step().items() if s not in counter.logging_steps}
    quiet = [s for s in per_step["none"] if s >= args.warmup and all(s in per_step[n] for n in names)]
    return {n: statistics.fmean(per_step[n][s] - per_step["none"][s] for s in quiet) for n in names}


def step_cost(times: list[float], warmup: int, log_every_n_steps: int) -> float:
    """Mean cost of a step, robust to stalls of a shared machine: the median of the ordinary steps, plus the
    logging steps' excess over it spread over all steps (the median alone would hide what logging costs)."""
    steps = list(enumerate(times))[warmup:]
    ordinary = [t for i, t in steps if (i + 1) % log_every_n_steps != 0]
    logging = [t for i, t in steps if (i + 1) % log_every_n_steps == 0]
    base = statistics.median(ordinary)
    return base + sum(max(t - base, 0.0) for t in logging) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["mlp", "cnn", "gpt"], default="mlp")
    parser.add_argument("--gpt-dims", default=GPT_DIMS, help="gpt: layers,width,heads,vocab,sequence")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-every-n-steps", type=int, default=50)
    parser.add_argument("--accumulate-grad-batches", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated; add zclip in its own env"
    )
    parser.add_argument("--compile", default=None, help="torch.compile the model's layers with this backend")
    parser.add_argument("--logdir", default="/tmp/gradwatch_bench")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: thread CPU time, torch on one thread (shared CPUs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    if args.clock == "cpu":
        torch.set_num_threads(1)  # thread CPU time measures one thread's work
    if "none" not in names:
        names.insert(0, "none")
    pl.seed_everything(0, verbose=False)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no config always runs first
        this_round = {}
        for n in order:
            this_round[n] = run_once(n, args)
            print(f"round {r}: {n} {this_round[n] * 1e3:.2f} ms", file=sys.stderr, flush=True)  # partial results
        for n in names:
            times[n].append(this_round[n])
            ratios[n].append(this_round[n] / this_round["none"])
    added = syncs_added(names, args)
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    params = sum(p.numel() for p in Bench(args.model, gpt_dims=args.gpt_dims).parameters())
    model = f"{args.model}({args.gpt_dims})" if args.model == "gpt" else args.model
    model += f" compiled({args.compile})" if args.compile else ""
    print(f"\nmodel={model} params={params / 1e6:.1f}M device={device} precision={args.precision} batch={args.batch_size} "
          f"accumulate={args.accumulate_grad_batches} steps/run={args.steps} rounds={args.rounds} log_every_n_steps={args.log_every_n_steps} clock={args.clock} torch={torch.__version__}\n")  # fmt: skip
    print(
        "| configuration | step cost (ms) | ratio to none (median over rounds) | min-max ratio | syncs added per non-logging step |"
    )
    print("|---|---|---|---|---|")
    for n in names:
        print(
            f"| {n} | {statistics.median(times[n]) * 1e3:.2f} | {statistics.median(ratios[n]):.3f} | "
            f"{min(ratios[n]):.3f}-{max(ratios[n]):.3f} | {added[n]:+.2f} |"
        )
    how = (
        "torch.cuda.set_sync_debug_mode"
        if args.device == "cuda"
        else "host reads counted by lightning_gradwatch/testing.py"
    )
    print(f"\nSyncs: {how}, in one more untimed fit per configuration, mean over the non-logging steps after warm-up.")


if __name__ == "__main__":
    main()
