"""Per-layer update-to-weight ratios ||w_after - w_before|| / ||w_before|| of small standard set-ups: the numbers
behind the alert defaults for the update-ratio check.

Set-ups (plain PyTorch loops on learnable synthetic tasks, one group per module as GradientNormLogger's
``group_by="module"`` reports them, measured with lightning_gradwatch.functional.dynamics every ``--every`` steps):

- ``cnn``: a ResNet-style CNN with BatchNorm, SGD (momentum 0.9, weight decay 5e-4), lr 0.1, on class-template
  images (3x16x16, 10 classes, noise);
- ``transformer``: a 2-layer causal transformer (d=64), AdamW (weight decay 0.01), lr 1e-3 with a linear warm-up
  of 50 steps, next-token prediction on a random sparse Markov chain (vocabulary 64);
- ``mlp``: a 3-hidden-layer ReLU MLP, Adam lr 1e-3, on a random-teacher classification task.

Each runs at its standard learning rate, at 30x and 100x it, and once with its first layer frozen through its
param group (``requires_grad`` stays True, lr 0). Per run: the loss at the start and the end, and over the steps
after warm-up (the second half of training and the first steps reported apart) the band of the per-layer ratios:
the 5th percentile, median and 95th percentile over every (layer, measured step), the smallest and largest
per-layer median, and the frozen layer's largest ratio.

    python benchmarks/update_ratio_bands.py                      # every set-up (about 3 minutes on one core)
    python benchmarks/update_ratio_bands.py --setups mlp --multipliers 1,30 --verbose
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradwatch.core import group_of
from lightning_gradwatch.functional import snapshot_for_update, update_ratios


# ----------------------------------------------------------------------------------------------- tasks, models
def images(batch: int, g: torch.Generator, templates: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 10, (batch,), generator=g)
    return templates[y] + 3.0 * torch.randn(batch, 3, 16, 16, generator=g), y


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        Block(32), nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        Block(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class CausalTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 64, layers: int = 2, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos(torch.arange(n))
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        return self.head(self.ln(self.blocks(h, mask=mask, is_causal=True)))


def markov_tokens(batch: int, g: torch.Generator, transitions: Tensor, seq: int = 33) -> Tensor:
    tokens = torch.empty(batch, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, transitions.shape[0], (batch,), generator=g)
    for t in range(1, seq):
        tokens[:, t] = torch.multinomial(transitions[tokens[:, t - 1]], 1, generator=g).squeeze(1)
    return tokens


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


@dataclass
class Setup:
    model: Callable[[], nn.Module]
    optimizer: Callable[[list[dict], float], torch.optim.Optimizer]
    lr: float
    warmup: int
    batches: Callable[[torch.Generator], Iterator[tuple[Tensor, Tensor]]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]


def cnn_batches(g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    templates = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    while True:
        yield images(64, g, templates)


def lm_batches(g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    gt = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 64, generator=gt) * 3  # peaked: each token has a few likely successors
    transitions = torch.softmax(logits, dim=1)
    while True:
        tokens = markov_tokens(32, g, transitions)
        yield tokens[:, :-1], tokens[:, 1:]


def mlp_batches(g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(3))
    while True:
        x = torch.randn(128, 32, generator=g)
        yield x, (x @ teacher).argmax(dim=1)


def classify(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def next_token(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())


SETUPS = {
    "cnn": Setup(
        cnn, lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9, weight_decay=5e-4), 0.1, 0, cnn_batches, classify
    ),
    "transformer": Setup(
        CausalTransformer,
        lambda g, lr: torch.optim.AdamW(g, lr=lr, weight_decay=0.01),
        1e-3,
        50,
        lm_batches,
        next_token,
    ),
    "mlp": Setup(mlp, lambda g, lr: torch.optim.Adam(g, lr=lr), 1e-3, 0, mlp_batches, classify),
}


# ------------------------------------------------------------------------------------------------------ a run
def run(setup: Setup, multiplier: float, freeze_first: bool, steps: int, every: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = setup.model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = list(dict.fromkeys(group_of(n, "module") for n, _ in named))
    index = torch.tensor([groups.index(group_of(n, "module")) for n, _ in named])
    params = [p for _, p in named]
    first = groups[0]
    frozen = [p for n, p in named if freeze_first and group_of(n, "module") == first]
    rest = [p for n, p in named if not (freeze_first and group_of(n, "module") == first)]
    lr = setup.lr * multiplier
    param_groups = [{"params": rest, "lr": lr}] + ([{"params": frozen, "lr": 0.0}] if frozen else [])
    optimizer = setup.optimizer(param_groups, lr)
    for g in optimizer.param_groups:
        g["target_lr"] = g["lr"]
    batches = setup.batches(torch.Generator().manual_seed(seed + 1))
    ratios: list[tuple[int, list[float]]] = []
    losses: list[float] = []
    for step in range(steps):
        if setup.warmup:
            for g in optimizer.param_groups:
                g["lr"] = g["target_lr"] * min(1.0, (step + 1) / setup.warmup)
        loss = setup.loss(model, next(batches))
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        measure = step % every == 0
        if measure:
            before = snapshot_for_update(params)
        optimizer.step()
        if measure:
            ratios.append((step, update_ratios(before, params, index, len(groups)).tolist()))
        if not math.isfinite(losses[-1]):
            break
    return {"groups": groups, "ratios": ratios, "losses": losses, "frozen": first if freeze_first else None}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summary(name: str, result: dict, warmup: int, steps: int, verbose: bool) -> str:
    groups, frozen = result["groups"], result["frozen"]
    live = [i for i, g in enumerate(groups) if g != frozen]
    early = [r for s, r in result["ratios"] if s < max(warmup, steps // 10)]
    late = [r for s, r in result["ratios"] if s >= steps // 2]
    losses = result["losses"]
    diverged = not math.isfinite(losses[-1])
    end = "NaN" if diverged else f"{statistics.fmean(losses[-20:]):.3g}"
    line = f"| {name} | {statistics.fmean(losses[:5]):.3g} -> {end} |"
    for rows in (early, late):
        values = [r[i] for r in rows for i in live if math.isfinite(r[i])]
        if not values:
            line += " - | - |"
            continue
        medians = [statistics.median([r[i] for r in rows]) for i in live]
        line += (
            f" {percentile(values, 0.05):.1e} / {statistics.median(values):.1e} / {percentile(values, 0.95):.1e} |"
            f" {min(medians):.1e}-{max(medians):.1e} |"
        )
    if frozen is not None:
        k = groups.index(frozen)
        line += f" {max(r[k] for _, r in result['ratios']):.1e} |"
    else:
        line += " |"
    if verbose:
        for i in live:
            per_layer = [r[i] for r in late] or [r[i] for r in early]
            line += f"\n|   {groups[i]} | | | | {statistics.median(per_layer):.1e} | | |"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="cnn,transformer,mlp")
    parser.add_argument("--multipliers", default="1,30,100")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="one line per layer (late median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"\nsteps={args.steps} measured every {args.every} steps; torch={torch.__version__}\n")
    print(
        "| run | loss start -> end | early p5 / median / p95 | early per-layer medians | late p5 / median / p95 |"
        " late per-layer medians | frozen layer max |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.setups.split(","):
        setup = SETUPS[name]
        for m in (float(v) for v in args.multipliers.split(",")):
            result = run(setup, m, False, args.steps, args.every, args.seed)
            print(summary(f"{name} lr x{m:g} ({setup.lr * m:g})", result, setup.warmup, args.steps, args.verbose))
        result = run(setup, 1.0, True, args.steps, args.every, args.seed)
        print(summary(f"{name} lr x1, first layer lr 0", result, setup.warmup, args.steps, args.verbose))
    print(
        "\nearly: steps before max(warm-up, 10% of training); late: the second half. p5 / median / p95 over every "
        "(layer, measured step); per-layer medians: the smallest and largest layer's median ratio."
    )


if __name__ == "__main__":
    main()
