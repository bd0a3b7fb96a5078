"""Cost of GradientGeometry: the probe's own time against a training step, and the amortised overhead at the
default cadence, measured without a Trainer so that the noise of a shared machine does not drown it.

A training step is forward + backward + AdamW on a batch; the probe is what the callback runs on a probe step at its
defaults (probe_size=16, radius=0.3, power_iterations=3, activation histograms on): two passes in eval mode on the
probe batch, the block spectra, and the one host transfer. Time is the main thread's CPU time with torch on one
thread, medians over interleaved repetitions. Amortised overhead = probe / step / every_n_steps (500 by default);
steps that are not probed run a modulo in ``on_train_batch_end`` and nothing else.

    python benchmarks/geometry_overhead.py                      # mlp, resnet, gpt
    python benchmarks/geometry_overhead.py --models gpt --iters 20 --every-n-steps 100
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightning_gradwatch as gw
from lightning_gradwatch.core import host_values
from lightning_gradwatch.geometry._probe import ActivationSample, find_blocks, probe_geometry


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, channels: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class GPT(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.ln(h))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[int], tuple[Any, Any]]]] = {
    "mlp": ("MLP 3x1024, ReLU", mlp, lambda b: (torch.randn(b, 256), torch.randint(0, 10, (b,)))),
    "resnet": (
        "ResNet 4 blocks x 32 ch, BN, 16x16",
        ResNet,
        lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,))),
    ),
    "gpt": (
        "GPT-style 4 x 256, seq 64",
        GPT,
        lambda b: (torch.randint(0, 1000, (b, 64)), torch.randint(0, 1000, (b, 64))),
    ),
}


def measure(name: str, batch: int, iters: int, every_n_steps: int) -> dict[str, Any]:
    title, make, data = MODELS[name]
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = data(batch)
    defaults = gw.GradientGeometry()
    blocks = find_blocks(model)
    assert blocks is not None
    sample = ActivationSample()
    probe_x = x[: defaults.probe_size].clone()

    def step() -> float:
        start = time.thread_time()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.thread_time() - start

    def probe() -> float:
        start = time.thread_time()
        result = probe_geometry(
            model,
            blocks,
            lambda: model(probe_x),
            radius=defaults.radius,
            power_iterations=defaults.power_iterations,
            generator=torch.Generator().manual_seed(defaults.seed),
            clean_forward_context=sample.subscribed(model),
        )
        measured = torch.cat([result.coherence, result.gain, result.sigma_max])
        host_values(measured, *(v for _, v in sample.take()))
        return time.thread_time() - start

    step(), probe()  # warm-up
    steps, probes = [], []
    for i in range(iters):
        steps.append(step())
        if i % 4 == 0:  # interleaved, fewer: a probe costs a few steps
            probes.append(probe())
    step_s, probe_s = statistics.median(steps), statistics.median(probes)
    return {
        "model": title,
        "blocks": f"{len(blocks.names)} ({blocks.rule})",
        "step_ms": 1e3 * step_s,
        "probe_ms": 1e3 * probe_s,
        "probe_steps": probe_s / step_s,
        "overhead": probe_s / step_s / every_n_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,resnet,gpt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--every-n-steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, batch {args.batch_size}")
    print()
    print(
        f"| model | blocks | step (ms) | probe (ms) | probe / step | overhead at every_n_steps={args.every_n_steps} |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.batch_size, args.iters, args.every_n_steps)
        print(
            f"| {r['model']} | {r['blocks']} | {r['step_ms']:.1f} | {r['probe_ms']:.1f} | {r['probe_steps']:.2f}x | "
            f"+{100 * r['overhead']:.3f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
