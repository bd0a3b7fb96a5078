"""Cost of a sampled step of DeadNeuronCallback / SaturationCallback, and the per-step overhead it implies at the
default cadence, measured without a Trainer so that the noise of a shared machine does not drown it.

Each iteration runs one forward + backward of the same batch three ways, interleaved: unwatched, with the
dead-unit probe attached for the forward pass, and with both callbacks attached (one shared probe). Time is the
main thread's CPU time with torch on one thread. The amortized overhead is (sampled - unwatched) / unwatched /
sample_every_n_steps; the check (one transfer per window of sampled steps) is timed separately.

    python benchmarks/activation_overhead.py                 # mlp, cnn, tanh-mlp
    python benchmarks/activation_overhead.py --iters 200 --models cnn
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightning_gradwatch as gw


class ResNetish(nn.Module):
    def __init__(self, channels: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    m
                    for _ in range(2)
                    for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
                ]
            )
            for _ in range(blocks)
        )
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        for conv1, bn1, conv2, bn2 in self.blocks:
            h = F.relu(h + bn2(conv2(F.relu(bn1(conv1(h))))))
        return self.fc(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, act: Any = F.relu, width: int = 1024, depth: int = 3) -> None:
        super().__init__()
        self.act = act
        self.layers = nn.ModuleList(nn.Linear(256 if i == 0 else width, width) for i in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


MODELS = {
    "mlp": (lambda: MLP(), (256,)),
    "cnn": (lambda: ResNetish(), (3, 16, 16)),
    "tanh-mlp": (lambda: MLP(torch.tanh), (256,)),
}


def measure(name: str, batch: int, iters: int) -> dict[str, float]:
    make, shape = MODELS[name]
    model = make()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    dead, saturation = gw.DeadNeuronCallback(), gw.SaturationCallback()

    def step(watchers: tuple[Any, ...]) -> float:
        start = time.thread_time()
        for w in watchers:
            w._attach(model)
        loss = F.cross_entropy(model(x), y)
        for w in watchers:
            w._detach()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.thread_time() - start

    configs = {"none": (), "dead_neurons": (dead,), "both": (dead, saturation)}
    for _ in range(5):
        for watchers in configs.values():
            step(watchers)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(iters):
        keys = list(configs)[i % 3 :] + list(configs)[: i % 3]  # rotate the order
        for k in keys:
            times[k].append(step(configs[k]))
    base = statistics.median(times["none"])
    out = {"step_ms": base * 1e3}
    for k in ("dead_neurons", "both"):
        sampled = statistics.median(times[k])
        out[f"{k}_sampled"] = sampled / base
        out[f"{k}_amortized"] = (sampled - base) / base / dead.sample_every_n_steps

    class FakeTrainer:  # the check needs only these from a Trainer
        global_step = 0
        is_global_zero = False
        loggers: list[Any] = []

    checks = []
    for _ in range(20):
        start = time.thread_time()
        dead._check(FakeTrainer())  # type: ignore[arg-type]
        saturation._check(FakeTrainer())  # type: ignore[arg-type]
        checks.append(time.thread_time() - start)
    # one check per window of sampled steps: every window * sample_every_n_steps steps
    out["check_amortized"] = statistics.median(checks) / base / (dead.window * dead.sample_every_n_steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(
        f"\n{platform.processor() or platform.machine()} CPU, 1 thread, thread CPU time, batch={args.batch_size}, "
        f"iters={args.iters}, defaults sample_every_n_steps=10 window=10, torch={torch.__version__}\n"
    )
    print("| model | step (ms) | sampled step, dead_neurons | sampled step, both | per-step overhead, dead_neurons "
          "| per-step overhead, both | check, per step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.batch_size, args.iters)
        print(
            f"| {name} | {r['step_ms']:.1f} | {r['dead_neurons_sampled']:.3f}x | {r['both_sampled']:.3f}x "
            f"| {r['dead_neurons_amortized']:+.2%} | {r['both_amortized']:+.2%} | {r['check_amortized']:+.3%} |"
        )


if __name__ == "__main__":
    main()
