"""Real training failures that gradwatch's detectors miss or misreport (issue 11), as small CPU models.

Each builder returns a :class:`FailureModule`: a LightningModule that reproduces one failure and records the raw
truth on every training step in ``module.trace`` (loss, raw gradient norms per layer before any callback touches
them, dead units per batch, activation norms), so a test can compare what gradwatch said with what happened::

    module = collapsed_cnn(seed=0)
    trainer = fit(module, steps=200, callbacks=[GradWatch()], root=tmp_path)
    assert zero_from(module.trace.grad_norm["net.conv2"]) is not None  # the truth: conv2 never learns again

Layer names are gradwatch's (a parameter's name without its last part: ``net.conv2``). Every run is seeded and
deterministic on CPU, and takes seconds. ``tests/report_failures.py`` runs them all under ``GradWatch()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import IN_FEATURES, NUM_CLASSES, classification_data, image_data, trainer_kwargs

Corrupt = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]
StepHook = Callable[["FailureModule", int], None]


@dataclass
class Trace:
    """The raw truth of a run, one entry per training step (index = ``global_step`` of the step)."""

    loss: list[float] = field(default_factory=list)
    global_norm: list[float] = field(default_factory=list)  # raw 2-norm of all gradients, before any clipping
    grad_norm: dict[str, list[float]] = field(default_factory=dict)  # per layer (weight and bias together)
    grad_rms: dict[str, list[float]] = field(default_factory=dict)  # norm / sqrt(numel)
    dead: dict[str, list[float]] = field(default_factory=dict)  # fraction of units with no positive output
    act_norm: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> module -> output norm (fp64)
    first_non_finite: dict[int, str] = field(default_factory=dict)  # step -> first module with a NaN/Inf output


class FailureModule(pl.LightningModule):
    """A network, its data and optimizer, an optional fault, and a recorder of the raw truth.

    Args:
        net: the network (``self.net``); layer names start with ``net.``.
        data: the training set; cycled for as many steps as the Trainer runs.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        lr: learning rate; ``lr_at`` may change it per step.
        corrupt: ``(step, x, y) -> (x, y)``, applied to each training batch (a NaN or outlier batch).
        before_step: ``(module, step)`` called at the start of each training step (e.g. poison a weight).
        dead_layers: modules whose outputs feed a ReLU: their dead fraction is recorded on every step.
        act_steps: record every leaf module's output norm (and the first non-finite one) for this many steps.
        lr_at: ``step -> lr`` (a learning-rate schedule), or ``None`` for a constant ``lr``.
        seed: seeds the data order.
    """

    def __init__(
        self,
        net: nn.Module,
        data: TensorDataset,
        optimizer: str = "sgd",
        lr: float = 0.05,
        batch_size: int = 32,
        corrupt: Corrupt | None = None,
        before_step: StepHook | None = None,
        dead_layers: tuple[str, ...] = (),
        act_steps: int = 0,
        lr_at: Callable[[int], float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net, self.data, self.optimizer_name, self.lr = net, data, optimizer, lr
        self.batch_size, self.corrupt, self.before_step, self.act_steps = batch_size, corrupt, before_step, act_steps
        self.lr_at, self.seed = lr_at, seed
        self.trace = Trace()
        self.dead_layers = dead_layers
        for name in dead_layers:
            self.get_submodule(name).register_forward_hook(self._dead_hook(name))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = self.global_step
        if self.before_step is not None:
            self.before_step(self, step)
        if self.lr_at is not None:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.lr_at(step)
        x, y = batch
        if self.corrupt is not None:
            x, y = self.corrupt(step, x, y)
        handles = self._watch_activations(step) if step < self.act_steps else []
        try:
            loss = F.cross_entropy(self(x), y)
        finally:
            for h in handles:
                h.remove()
        self.trace.loss.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        # the module's hook runs after every callback's on_after_backward and before on_before_optimizer_step:
        # the gradients here are the raw ones, before any clipping or NaNGuard's drop
        by_layer: dict[str, list[Tensor]] = {}
        for name, p in self.named_parameters():
            if p.grad is not None:
                by_layer.setdefault(name.rsplit(".", 1)[0], []).append(p.grad.detach().double().reshape(-1))
        total = 0.0
        for layer, parts in by_layer.items():
            g = torch.cat(parts)
            norm = float(g.norm())
            self.trace.grad_norm.setdefault(layer, []).append(norm)
            self.trace.grad_rms.setdefault(layer, []).append(norm / math.sqrt(g.numel()))
            total += norm**2
        self.trace.global_norm.append(math.sqrt(total))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=gen)

    # -- recorders -------------------------------------------------------------------------------------------
    def _dead_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if self.training and self._trainer is not None and self.trainer.training:
                # a unit (feature or channel, dim 1) is dead on this batch if its output is <= 0 everywhere
                alive = out.detach().transpose(0, 1).reshape(out.shape[1], -1).amax(dim=1) > 0
                self.trace.dead.setdefault(name, []).append(1.0 - float(alive.float().mean()))

        return hook

    def _watch_activations(self, step: int) -> list[Any]:
        norms: dict[str, float] = {}
        self.trace.act_norm[step] = norms

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, tuple):
                    out = out[0]
                norms[name] = float(out.detach().double().norm())
                if step not in self.trace.first_non_finite and not bool(torch.isfinite(out).all()):
                    self.trace.first_non_finite[step] = name

            return record

        return [m.register_forward_hook(hook(n)) for n, m in self.named_modules() if n and not list(m.children())]


# -- the scenarios --------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """2 conv + 2 fc, ReLU (issue 11, scenario 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def collapsed_cnn(seed: int = 0, lr: float = 5.0) -> FailureModule:
    """Adam at lr=5 on a learnable 8x8 image task: the first steps blow up, then conv1, conv2 and fc1 pass no
    gradient at all (exactly 0.0) for the rest of the run; only fc2's bias still learns (the class prior)."""
    torch.manual_seed(seed)
    return FailureModule(
        SmallCNN(), image_data(512, seed), "adam", lr, dead_layers=("net.conv1", "net.conv2", "net.fc1"), seed=seed
    )


class MLP(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ReLU -> head``, optionally with BatchNorm after fc1 and fc2."""

    def __init__(self, width: int = 64, batchnorm: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(IN_FEATURES, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.bn1 = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.unused = nn.Linear(4, 4) if unused else None  # registered, optimized, never in the forward pass

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))))


def dead_layer_mlp(seed: int = 0, dead_fraction: float = 1.0) -> FailureModule:
    """fc2's biases (the first ``dead_fraction`` of its units) start at -10 before a ReLU: those units are dead
    from the first step and never receive a gradient."""
    torch.manual_seed(seed)
    net = MLP()
    with torch.no_grad():
        net.fc2.bias[: round(dead_fraction * net.fc2.out_features)] = -10.0
    return FailureModule(net, classification_data(1024, seed), lr=0.05, dead_layers=("net.fc1", "net.fc2"), seed=seed)


def unit_kill_mlp(
    seed: int = 0,
    kill_step: int = 80,
    kill_steps: int = 1,
    kill_lr: float = 2.0,
    scale: float = 10.0,
    shift: float = 10.0,
) -> FailureModule:
    """A healthy MLP (SGD, lr 0.05) until ``kill_step``; for ``kill_steps`` steps from there the learning rate is
    ``kill_lr`` and the inputs are ``x * scale + shift`` (an outlier batch). Without clipping, the defaults kill
    half of fc2's units at once and 95% within 170 steps. ``kill_steps=10**9, kill_lr=1.0, scale=1.0,
    shift=0.0``: the learning rate alone jumps for good (a schedule bug): fc2 dies even under clipping."""
    torch.manual_seed(seed)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x * scale + shift, y) if kill_step <= step < kill_step + kill_steps else (x, y)

    return FailureModule(
        MLP(),
        classification_data(1024, seed),
        lr=0.05,
        corrupt=corrupt,
        lr_at=lambda step: kill_lr if kill_step <= step < kill_step + kill_steps else 0.05,
        dead_layers=("net.fc1", "net.fc2"),
        seed=seed,
    )


def overflow_mlp(seed: int = 0, depth: int = 40, width: int = 64, gain: float = 3.0) -> FailureModule:
    """A ``depth``-layer ReLU MLP with weights ``gain`` x He's std: every layer multiplies the activations by
    about ``gain``, the logits reach ~1e19 at the first step and float32 overflows within the first steps."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = IN_FEATURES
    for _ in range(depth):
        linear = nn.Linear(d, width)
        nn.init.normal_(linear.weight, std=gain * math.sqrt(2.0 / d))
        layers += [linear, nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, NUM_CLASSES))
    return FailureModule(nn.Sequential(*layers), classification_data(1024, seed), lr=0.01, act_steps=3, seed=seed)


def deep_tanh_cnn(seed: int = 0, depth: int = 14, channels: int = 8, init_scale: float = 0.7) -> FailureModule:
    """``depth`` 3x3 conv layers with tanh, no normalisation, no residuals, PyTorch's default init scaled by
    ``init_scale``: the gradient RMS falls ~0.4 decades per layer towards the input; the first layer's is ~2e-8,
    ~1e-6 of the head's (``depth=16``: ~3e-9 and ~1e-7, the issue's figures)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for _ in range(depth):
        conv = nn.Conv2d(c, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(init_scale)
        layers += [conv, nn.Tanh()]
        c = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    return FailureModule(nn.Sequential(*layers), image_data(512, seed), lr=0.05, seed=seed)


class VanillaRNN(nn.Module):
    """``nn.RNN`` (tanh, no bias) with orthogonal recurrent weights x ``recurrent_gain`` and a weak input; keeps
    the fraction of saturated states (``|h| > 0.99``) of each training forward pass in ``saturation``."""

    def __init__(self, hidden: int, recurrent_gain: float, input_gain: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(IN_FEATURES, hidden, batch_first=True, bias=False)
        self.head = nn.Linear(hidden, NUM_CLASSES)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=recurrent_gain)
            self.rnn.weight_ih_l0.mul_(input_gain)
        self.saturation: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        if self.training:
            self.saturation.append(float((out.detach().abs() > 0.99).float().mean()))
        return self.head(out[:, -1])


def exploding_rnn(
    seed: int = 0, seq_len: int = 30, hidden: int = 32, recurrent_gain: float = 2.0, input_gain: float = 1e-6
) -> FailureModule:
    """A vanilla tanh RNN whose recurrent weights have every singular value ``recurrent_gain``: while the state is
    small it grows ``recurrent_gain`` x per time step, so the first backward pass multiplies the gradient by about
    ``recurrent_gain ** seq_len`` (global norm ~2e6 at step 0 with the defaults); the SGD update then saturates
    the state for the rest of the run."""
    torch.manual_seed(seed)
    net = VanillaRNN(hidden, recurrent_gain, input_gain)
    return FailureModule(net, classification_data(1024, seed, seq_len=seq_len), lr=0.01, seed=seed)


def batchnorm_nan(seed: int = 0, nan_step: int = 15) -> FailureModule:
    """An MLP with BatchNorm1d whose batch at ``nan_step`` is all NaN: the forward pass writes NaN into the
    BatchNorm running statistics before any gradient exists."""
    torch.manual_seed(seed)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.full_like(x, math.nan), y) if step == nan_step else (x, y)

    return FailureModule(MLP(batchnorm=True), classification_data(1024, seed), corrupt=corrupt, seed=seed)


def unused_nan(seed: int = 0, poison_step: int = 20, fault_step: int = 60) -> FailureModule:
    """An MLP with a registered but unused Linear (``net.unused``): NaN is written into its weight at
    ``poison_step`` (no gradient ever reaches it, so no gradient check sees it); the batch at ``fault_step`` is
    NaN, a fault that ``NaNGuard(action="rollback")`` answers by restoring its snapshot."""
    torch.manual_seed(seed)

    def poison(module: FailureModule, step: int) -> None:
        if step == poison_step:
            with torch.no_grad():
                module.net.unused.weight.fill_(math.nan)  # type: ignore[union-attr]

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.full_like(x, math.nan), y) if step == fault_step else (x, y)

    return FailureModule(
        MLP(unused=True), classification_data(1024, seed), corrupt=corrupt, before_step=poison, seed=seed
    )


# -- running and reading the truth ----------------------------------------------------------------------------
def fit(module: pl.LightningModule, steps: int, callbacks: list[Any], root: str | Path, **overrides: Any) -> pl.Trainer:
    """Train as a user would, for ``steps`` optimizer steps: the Trainer's ``log_every_n_steps=50``, a TensorBoard
    logger and a ModelCheckpoint (where NaNGuard saves its halt checkpoint); quiet, on CPU."""
    checkpoint = ModelCheckpoint(dirpath=str(Path(root, "checkpoints")))
    kwargs = trainer_kwargs(root, max_steps=steps, max_epochs=-1, log_every_n_steps=50, enable_checkpointing=True)
    trainer = pl.Trainer(**{**kwargs, "callbacks": [*callbacks, checkpoint], **overrides})
    trainer.fit(module)
    return trainer


class UpdateRecorder(Callback):
    """Records, per optimizer step, the global gradient norm that reaches the optimizer (after every callback
    listed before it, e.g. ``GradWatch``'s clipping); ``None`` where the update was dropped (NaNGuard)."""

    def __init__(self) -> None:
        self.norms: list[float | None] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.detach().double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()) if grads else None)


def zero_from(values: list[float]) -> int | None:
    """The first step from which ``values`` (a per-step gradient norm) is exactly 0.0 to the end, or None."""
    return _holds_from(values, lambda v: v == 0.0)


def at_least_from(values: list[float], level: float) -> int | None:
    """The first step from which ``values`` (e.g. a dead fraction) stays >= ``level`` to the end, or None."""
    return _holds_from(values, lambda v: v >= level)


def _holds_from(values: list[float], holds: Callable[[float], bool]) -> int | None:
    start = len(values)
    while start > 0 and holds(values[start - 1]):
        start -= 1
    return start if start < len(values) else None


def non_finite_tensors(path: str | Path, sections: tuple[str, ...] = ("state_dict", "optimizer_states")) -> list[str]:
    """Every tensor in the given top-level ``sections`` of a checkpoint file that holds NaN or Inf, by its path
    (``state_dict.net.bn1.running_mean``). ``sections=()`` scans everything (ModelCheckpoint's own ``kth_value``
    is ``inf`` by design)."""
    found: list[str] = []

    def scan(obj: Any, where: str) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                found.append(where)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                scan(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                scan(v, f"{where}.{i}")

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    scan({k: v for k, v in checkpoint.items() if not sections or k in sections}, "")
    return found
