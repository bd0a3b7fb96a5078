"""Activation probing shared by DeadNeuronCallback and SaturationCallback.

Forward hooks on the layers that produce activations' inputs (Linear, Conv, and normalisation layers, which
pass a producer's units through) tag their output tensors with a layer name; a TorchFunctionMode sees every
rectifier, sigmoid and tanh call - as a module (``nn.ReLU``) or a function (``F.relu``, ``torch.tanh``,
``x.sigmoid()``) alike - and ties its input back to the layer that produced it. Both are installed only for the
forward pass of sampled training steps and removed right after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gradwatch._core import GradwatchCallback, check_positive_int, clean_name, logger_step

_PRODUCERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_LAST_DIM_NORMS = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))  # RMSNorm: torch >= 2.4
_UNIT_PASSING_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, *_LAST_DIM_NORMS)
_RECTIFIERS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_"}
_SQUASHERS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}

#: ``(layer name, unit dim, activation kind, pre-activation)``; kind is "relu", "sigmoid" or "tanh".
ActivationSink = Callable[[str, int, str, Tensor], None]


def activation_kind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of activation a torch function call is, or ``None`` for anything else (GELU, hard-tanh, ...)."""
    if name in ("relu", "relu_"):
        return "relu"
    if name in ("leaky_relu", "leaky_relu_"):  # a dead unit exists only without a negative slope
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return "relu" if slope == 0 else None
    if name in ("hardtanh", "hardtanh_"):  # nn.ReLU6 is hardtanh(x, 0, 6); the real hard-tanh is out of scope
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        return "relu" if low == 0 else None
    if name in ("sigmoid", "sigmoid_"):
        return "sigmoid"
    if name in ("tanh", "tanh_"):
        return "tanh"
    return None


class _ActivationMode(TorchFunctionMode):
    def __init__(self, probe: ActivationProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.probe.watched_names and args and isinstance(args[0], Tensor):
            source = self.probe.sources.get(id(args[0]))
            kind = activation_kind(name, args, kwargs) if source is not None else None
            if kind is not None and kind in self.probe.kinds:
                layer, unit_dim, _ = source  # type: ignore[misc]
                self.probe.sink(layer, unit_dim, kind, args[0])  # before the call: in-place ops change args[0]
        return func(*args, **kwargs)


class ActivationProbe:
    """Watches the activations of one model's forward passes while attached.

    Args:
        kinds: the activation kinds to report: any of ``"relu"``, ``"sigmoid"``, ``"tanh"``.
        sink: called with ``(layer, unit_dim, kind, pre_activation)`` for each watched activation call whose input
            came straight from a Linear/Conv layer (or through a normalisation layer after one).
    """

    def __init__(self, kinds: set[str], sink: ActivationSink) -> None:
        self.kinds = kinds
        self.sink = sink
        self.watched_names = (_RECTIFIERS if "relu" in kinds else set()) | (_SQUASHERS if kinds - {"relu"} else set())
        # id(tensor) -> (layer, unit dim, the tensor itself: held so the id cannot be reused while attached)
        self.sources: dict[int, tuple[str, int, Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        self._mode: _ActivationMode | None = None

    @property
    def attached(self) -> bool:
        return self._mode is not None

    def attach(self, model: nn.Module) -> None:
        if self.attached:
            return
        for raw_name, module in model.named_modules():
            name = clean_name(raw_name)
            if isinstance(module, _PRODUCERS):
                unit_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
                self._handles.append(module.register_forward_hook(self._producer_hook(name, unit_dim)))
            elif isinstance(module, _UNIT_PASSING_NORMS):
                unit_dim = -1 if isinstance(module, _LAST_DIM_NORMS) else 1
                self._handles.append(module.register_forward_hook(self._norm_hook(name, unit_dim)))
        self._mode = _ActivationMode(self)
        self._mode.__enter__()

    def detach(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.sources.clear()

    def _producer_hook(self, name: str, unit_dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                self.sources[id(output)] = (name, unit_dim, output)

        return hook

    def _norm_hook(self, name: str, unit_dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            upstream = self.sources.get(id(inputs[0])) if inputs else None
            # conv -> bn -> relu: the units are the conv's channels, report them under the conv's name
            layer = upstream[0] if upstream is not None and upstream[1] == unit_dim else name
            self.sources[id(output)] = (layer, unit_dim, output)

        return hook


class ActivationCallback(GradwatchCallback):
    """The cadence and lifecycle shared by the activation callbacks: sample every ``sample_every_n_steps``
    optimizer steps, fold ``window`` sampled batches together, then check (one reduction across ranks, one host
    transfer), log, alert and start a new window. Subclasses implement :meth:`_record` and :meth:`_check`."""

    hook_order = 20
    kinds: set[str] = set()

    def __init__(self, sample_every_n_steps: int, window: int) -> None:
        super().__init__()
        check_positive_int("sample_every_n_steps", sample_every_n_steps)
        check_positive_int("window", window)
        self.sample_every_n_steps = sample_every_n_steps
        self.window = window
        self._batches_in_window = 0
        self._probe = ActivationProbe(self.kinds, self._record)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # validation, the sanity check and prediction run outside these hooks: only training batches are sampled
        if trainer.sanity_checking or logger_step(trainer) % self.sample_every_n_steps != 0:
            return
        self._probe.attach(pl_module)
        self._batches_in_window += 1

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._probe.detach()  # the forward pass is over: nothing to watch in backward or the optimizer step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        was_sampled = self._probe.attached or self._sampled_this_batch(trainer)
        self._probe.detach()
        if was_sampled and self._batches_in_window >= self.window:
            self._check(trainer)
            self._batches_in_window = 0

    def _sampled_this_batch(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and logger_step(trainer) % self.sample_every_n_steps == 0

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._probe.detach()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe.detach()

    def _record(self, layer: str, unit_dim: int, kind: str, pre_activation: Tensor) -> None:
        raise NotImplementedError

    def _check(self, trainer: pl.Trainer) -> None:
        raise NotImplementedError
