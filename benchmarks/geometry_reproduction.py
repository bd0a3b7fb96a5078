"""GradientGeometry against the papers it measures: the figures recorded in benchmarks/RESULTS_geometry.md.

1. Shattered gradients (Balduzzi et al. 2017): input-gradient coherence of plain He-init ReLU MLPs and of residual
   MLPs (pre-LayerNorm blocks) with the same number of Linear layers, at init, over several seeds.
2. Dynamical isometry (Saxe et al. 2014, Pennington et al. 2017): per-block Jacobian gains and largest singular
   values of a 24-layer tanh MLP with orthogonal weights against Gaussian weights too small, critical and too large.
3. Early warning: the step at which GradientGeometry names vanishing (``vanishing_jacobian``) against the step at
   which GradientNormLogger raises ``vanishing_gradient``, in real fits of tanh MLPs initialised too small.
4. Healthy models in training: the lowest coherence and the range of the gain product seen, to calibrate the alerts.

Every probe uses the callback's defaults (probe_size, radius, power_iterations, seed). The models are the tests'
(``tests/geometry_models.py``): run from the repository root.

    python benchmarks/geometry_reproduction.py
    python benchmarks/geometry_reproduction.py --parts 1,2 --seeds 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradwatch import GradientGeometry, GradientNormLogger
from lightning_gradwatch.functional.geometry import gain_product
from lightning_gradwatch.geometry._probe import find_blocks, probe_geometry
from tests.geometry_models import BertLike, plain_mlp, residual_mlp, token_data
from tests.models import IN_FEATURES, Classifier, TinyTransformer, classification_data, image_data, mlp, resnet

DEFAULTS = GradientGeometry()


def probe(model: nn.Module, seed: int, power_iterations: int | None = None) -> Any:
    x = torch.randn(DEFAULTS.probe_size, IN_FEATURES, generator=torch.Generator().manual_seed(1000 + seed))
    blocks = find_blocks(model)
    assert blocks is not None
    return probe_geometry(
        model,
        blocks,
        lambda: model(x),
        radius=DEFAULTS.radius,
        power_iterations=DEFAULTS.power_iterations if power_iterations is None else power_iterations,
        generator=torch.Generator().manual_seed(DEFAULTS.seed),
    )


def shattering(seeds: int) -> None:
    print(
        f"\n### 1. Coherence at init (radius {DEFAULTS.radius}, {DEFAULTS.probe_size} probe samples, {seeds} seeds)\n"
    )
    print("| Linear layers | plain ReLU, He init | residual (pre-LN blocks) |")
    print("|---|---|---|")
    for depth in (4, 8, 16, 24, 48):
        cells = []
        for make in (plain_mlp, residual_mlp):
            values = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                values.append(probe(make(depth), seed, 0).coherence[0].item())
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}")
        print(f"| {depth} | {cells[0]} | {cells[1]} |", flush=True)


def isometry(seeds: int) -> None:
    print("\n### 2. Block Jacobians of a 24-layer tanh MLP at init (23 shape-keeping blocks; 5 power iterations)\n")
    print("| init | gain min / median / max | sigma_max / gain (median) | product of gains |")
    print("|---|---|---|---|")
    for title, init, gain in (
        ("orthogonal, gain 1", "orthogonal", 1.0),
        ("Gaussian std 0.8/sqrt(n) (too small)", "gaussian", 0.8),
        ("Gaussian std 1/sqrt(n) (critical)", "gaussian", 1.0),
        ("Gaussian std 2/sqrt(n) (too large)", "gaussian", 2.0),
    ):
        torch.manual_seed(0)
        result = probe(plain_mlp(24, act=nn.Tanh, init=init, gain=gain), 0, power_iterations=5)
        square = torch.tensor(result.square)
        gains, sigmas = result.gain[square], result.sigma_max[square]
        print(
            f"| {title} | {gains.min():.3f} / {gains.median():.3f} / {gains.max():.3f} | "
            f"{(sigmas / gains).median():.2f} | {gain_product(gains).item():.3g} |",
            flush=True,
        )


def fit(model: pl.LightningModule, callbacks: list[Any], steps: int) -> None:
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_steps=steps,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        trainer.fit(model)


def first(alerts: list[Any], kind: str) -> str:
    steps = [a.step for a in alerts if a.kind == kind]
    return str(steps[0]) if steps else "never"


def early_warning(steps: int, every: int) -> None:
    print(f"\n### 3. First alert step, tanh MLPs of 24 layers, SGD lr 0.05, {steps} steps\n")
    print(f"GradientGeometry(every_n_steps={every}); GradientNormLogger checks every step.\n")
    print("| init std x sqrt(n) | product of gains at step 0 | vanishing_jacobian | vanishing_gradient |")
    print("|---|---|---|---|")
    for gain in (0.5, 0.6, 0.7, 0.8, 0.9):
        torch.manual_seed(0)
        geometry, norms = GradientGeometry(every_n_steps=every), GradientNormLogger()
        net = plain_mlp(24, act=nn.Tanh, init="gaussian", gain=gain)
        product = gain_product(probe(net, 0).gain[torch.tensor(probe(net, 0).square)]).item()
        fit(Classifier(net, data=classification_data(4096), lr=0.05), [geometry, norms], steps)
        print(
            f"| {gain} | {product:.3g} | {first(geometry.alerts, 'vanishing_jacobian')} | "
            f"{first(norms.alerts, 'vanishing_gradient')} |",
            flush=True,
        )


class TokenClassifier(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["ids"], batch["mask"]), batch["label"])


class Recorder(GradientGeometry):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[float, float]] = []

    def _report(self, trainer: pl.Trainer, coherence: list[float], gains: list[float], *args: Any) -> None:
        square = args[1]
        product = gain_product(torch.tensor([g for g, s in zip(gains, square, strict=True) if s])).item()
        self.seen.append((coherence[0], product))
        super()._report(trainer, coherence, gains, *args)


HEALTHY: dict[str, Callable[[], pl.LightningModule]] = {
    "ReLU MLP, 4 layers, He init": lambda: Classifier(
        plain_mlp(4), data=classification_data(4096), optimizer="adam", lr=1e-3
    ),
    "tests' mlp() (3 layers, PyTorch default init)": lambda: Classifier(mlp(), optimizer="adam", lr=1e-3),
    "ResNet-style (BatchNorm, 2 residual blocks)": lambda: Classifier(
        resnet(), data=image_data(2048), optimizer="adam", lr=1e-3
    ),
    "post-LN transformer, 4 layers": lambda: Classifier(
        TinyTransformer(layers=4), data=classification_data(2048, seq_len=8), optimizer="adam", lr=1e-3
    ),
    "tanh MLP, 24 layers, orthogonal": lambda: Classifier(
        plain_mlp(24, act=nn.Tanh, init="orthogonal"), data=classification_data(4096), optimizer="adam", lr=1e-3
    ),
    "BERT-like, 4 post-LN layers on token ids": lambda: TokenClassifier(
        BertLike(), data=token_data(2048), optimizer="adam", lr=1e-3
    ),
}


def healthy(steps: int, every: int) -> None:
    print(f"\n### 4. Healthy models, {steps} steps of Adam lr 1e-3, probed every {every} steps\n")
    print("| model | coherence min | gain product min / max | alerts |")
    print("|---|---|---|---|")
    for title, make in HEALTHY.items():
        torch.manual_seed(0)
        forward = (lambda m, b: m.net(b["ids"], b["mask"])) if "BERT" in title else None
        recorder = Recorder(every_n_steps=every, forward_fn=forward)
        fit(make(), [recorder], steps)
        coherence = [c for c, _ in recorder.seen]
        products = [p for _, p in recorder.seen]
        alerts = ", ".join(f"{a.kind}@{a.step}" for a in recorder.alerts) or "none"
        print(f"| {title} | {min(coherence):.2f} | {min(products):.3g} / {max(products):.3g} | {alerts} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="1,2,3,4")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_gradwatch").setLevel(logging.ERROR)
    parts = set(args.parts.split(","))
    if "1" in parts:
        shattering(args.seeds)
    if "2" in parts:
        isometry(args.seeds)
    if "3" in parts:
        early_warning(args.steps, args.every_n_steps)
    if "4" in parts:
        healthy(args.steps, args.every_n_steps)


if __name__ == "__main__":
    main()
