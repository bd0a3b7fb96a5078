"""Models and helpers shared by the DeadNeuronCallback and SaturationCallback tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import IN_FEATURES, NUM_CLASSES, trainer_kwargs


class Net(nn.Module):
    """Two hidden layers; the activation is applied as a module or as one of the functional spellings."""

    def __init__(self, style: str, act: str = "relu", width: int = 64, gain: float = 1.0) -> None:
        super().__init__()
        self.style, self.act = style, act
        self.fc1, self.fc2, self.head = (
            nn.Linear(IN_FEATURES, width),
            nn.Linear(width, width),
            nn.Linear(width, NUM_CLASSES),
        )
        self.module_act = {"relu": nn.ReLU(inplace=True), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[act]
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.mul_(gain)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            return self.module_act(x)
        if self.act == "relu":
            return {
                "functional": F.relu,
                "torch": torch.relu,
                "method": lambda t: t.relu(),
                "inplace": lambda t: F.relu(t, inplace=True),
                "relu6": F.relu6,
                "leaky0": lambda t: F.leaky_relu(t, 0.0),
            }[self.style](x)
        if self.act == "tanh":
            return {"functional": F.tanh, "torch": torch.tanh, "method": lambda t: t.tanh()}[self.style](x)
        return {"functional": F.sigmoid, "torch": torch.sigmoid, "method": lambda t: t.sigmoid()}[self.style](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.activation(self.fc2(self.activation(self.fc1(x)))))


def kill(layer: nn.Linear, fraction: float) -> None:
    """Make the first ``fraction`` of a layer's units dead: a bias so negative they never fire."""
    with torch.no_grad():
        layer.bias[: int(layer.out_features * fraction)] = -1e3


def fit(tmp_path: Any, model: pl.LightningModule, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(model)
    return trainer


def no_probe_left(model: nn.Module) -> bool:
    """No forward hook on any module and no TorchFunctionMode on the stack."""
    hooks = any(m._forward_hooks for m in model.modules())
    return not hooks and torch._C._len_torch_function_stack() == 0
