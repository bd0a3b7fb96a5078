"""Calibration of GradientNoiseScale's ``ema_decay``: how far the logged B_simple is from the truth, per decay.

A plain PyTorch loop trains a small ReLU MLP with SGD (momentum 0.9) on a random-teacher classification task, in
optimizer steps of ``--accumulate`` micro-batches of ``--micro-batch`` examples, as Lightning's gradient
accumulation does. Every ``--every`` steps (the logging cadence) it takes the same two squared norms the callback
takes (the first micro-batch's mean gradient and the step's mean gradient), folds them into one EMA per decay with
the package's own estimator (lightning_gradwatch.functional.noise_scale), and computes the truth from the
per-example gradients of the whole training set (torch.func vmap of grad). The truth moves as the model trains:
the error mixes the estimator's noise with the EMA's lag.

Reported per decay: the median and 90th percentile of |log(estimate / truth)| over the second half of training
(``exp`` of it gives the factor), the median of estimate / truth (a bias), and how many logged values came
out undefined (an averaged term <= 0).

    python benchmarks/noise_scale_calibration.py
    python benchmarks/noise_scale_calibration.py --micro-batch 32 --accumulate 4 --steps 3000
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gradwatch.functional import noise_scale_ema_update, noise_scale_readout, noise_scale_state
from lightning_gradwatch.functional import noise_scale_terms as terms


def task(n: int, seed: int, classes: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = teacher(x).argmax(dim=1)
    flip = torch.rand(n, generator=g) < 0.1  # 10% label noise: the gradient never vanishes at the end
    return x, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)


def true_b_simple(net: nn.Module, x: Tensor, y: Tensor, chunk: int = 1024) -> float:
    """tr(Sigma) / |G|^2 over the whole training set, from per-example gradients taken in chunks."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total, sq_norms = 0.0, 0.0
    for start in range(0, len(x), chunk):
        grads = per_example(params, x[start : start + chunk], y[start : start + chunk])
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()
        total = total + flat.sum(dim=0)
        sq_norms += float(flat.square().sum())
    mean = total / len(x)
    grad_sq = float(mean.square().sum())
    return (sq_norms / len(x) - grad_sq) / grad_sq


def squared_norm(net: nn.Module) -> Tensor:
    return torch.stack([p.grad.double().square().sum() for p in net.parameters()]).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=10, help="measurement cadence in optimizer steps")
    parser.add_argument("--truth-every", type=int, default=20, help="compare with the truth every this many steps")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--classes", type=int, default=10, help="more classes: more directions of gradient noise")
    parser.add_argument("--decays", default="0,0.5,0.8,0.9,0.95,0.98,0.99")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x, y = task(args.examples, args.seed, args.classes)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, args.classes))
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    decays = [float(d) for d in args.decays.split(",")]
    states = {d: noise_scale_state() for d in decays}
    b, a = args.micro_batch, args.accumulate
    errors: dict[float, list[float]] = {d: [] for d in decays}
    undefined = dict.fromkeys(decays, 0)
    truths, losses = [], []
    for step in range(args.steps):
        optimizer.zero_grad()
        measure = (step + 1) % args.every == 0
        for i in range(a):
            idx = torch.randint(0, args.examples, (b,))
            loss = F.cross_entropy(net(x[idx]), y[idx]) / a  # as Lightning scales micro-batch losses
            loss.backward()
            losses.append(float(loss.detach()) * a)
            if measure and i == 0:
                small = squared_norm(net) * a * a
        if measure:
            big = squared_norm(net)
            grad_sq, trace = terms(small, big, b, a * b)
            for d in decays:
                states[d] = noise_scale_ema_update(states[d], grad_sq, trace, d)
        if (step + 1) % args.truth_every == 0 and step >= args.every:
            truth = true_b_simple(net, x, y)
            truths.append(truth)
            for d in decays:
                estimate = float(noise_scale_readout(states[d])[2])
                if step < args.steps // 2:
                    continue
                if not estimate > 0:  # NaN: averaged |G|^2 <= 0; <= 0: averaged tr(Sigma) <= 0
                    undefined[d] += 1
                else:
                    errors[d].append(math.log(estimate / truth))
        optimizer.step()
    half = truths[len(truths) // 2 :]
    print(
        f"\nB = {a} x {b} = {a * b} examples per step, {args.steps} steps, measured every {args.every}; true B_simple "
        f"{truths[0]:.0f} at the start, {min(half):.0f}-{max(half):.0f} over the second half; loss "
        f"{statistics.fmean(losses[:50]):.2f} -> {statistics.fmean(losses[-200:]):.2f}\n"
    )
    print("| ema_decay | median factor off | 90th percentile factor off | median estimate / truth | undefined |")
    print("|---|---|---|---|---|")
    for d in decays:
        e = sorted(abs(v) for v in errors[d])
        if not e:
            print(f"| {d} | - | - | - | {undefined[d]} |")
            continue
        p90 = e[min(len(e) - 1, int(0.9 * len(e)))]
        signed = math.exp(statistics.median(errors[d]))
        print(f"| {d} | {math.exp(statistics.median(e)):.2f}x | {math.exp(p90):.2f}x | {signed:.2f} | {undefined[d]} |")


if __name__ == "__main__":
    main()
