"""Activation probing shared by DeadNeuronCallback and SaturationCallback.

Forward hooks on the layers that produce activations' inputs (Linear, Conv, and normalisation layers, which
pass a producer's units through) tag their output tensors with a layer; a TorchFunctionMode sees every
rectifier, sigmoid and tanh call - as a module (``nn.ReLU``) or a function (``F.relu``, ``torch.tanh``,
``x.sigmoid()``) alike - and ties its input back to the layer that produced it. Both are installed only for the
forward pass of sampled training steps and removed right after.

Only hidden activations count: a call is kept when another Linear/Conv/normalisation layer runs after it in the
same forward pass, so the sigmoid that turns a binary classifier's logits into probabilities (or an autoencoder's
output) - which may legitimately sit near 0 or 1 - is never reported.

One probe per model, shared by every activation callback sampling it, so the preset's two callbacks cost one
mode and one set of hooks. The layers are enumerated once per model, in module order, with their unit counts:
every rank builds the same layout whatever its data did, so the per-check collective always matches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_gradwatch._params import clean_name

_PRODUCERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_LAST_DIM_NORMS = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))  # RMSNorm: torch >= 2.4
_UNIT_PASSING_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, *_LAST_DIM_NORMS)
_RECTIFIERS = {"relu", "relu_", "relu6", "relu6_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_"}
_SQUASHERS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
_SMOOTH = {"gelu", "silu", "silu_"}  # watched only for a subscriber that asks for them (GradientGeometry)
KINDS = ("relu", "sigmoid", "tanh", "gelu", "silu")


def activation_kind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of activation a torch function call is, or ``None`` for anything else (hard-tanh, ...)."""
    if name in ("relu", "relu_", "relu6", "relu6_"):
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
    if name == "gelu":
        return "gelu"
    if name in ("silu", "silu_"):
        return "silu"
    return None


@dataclass(frozen=True)
class Layer:
    """A layer whose units an activation can be attributed to."""

    name: str
    units: int
    unit_dim: int  # -1 for Linear and LayerNorm, 1 for Conv, BatchNorm, GroupNorm


def _units(module: nn.Module) -> tuple[int, int] | None:
    """``(units, unit dim)`` of a producer or unit-passing normalisation layer, else ``None``."""
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return module.out_features, -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, _LAST_DIM_NORMS):
        shape = module.normalized_shape
        return (int(shape[-1]), -1) if shape else None
    return None


class ActivationSubscriber:
    """What a callback provides to an :class:`ActivationProbe`."""

    kinds: frozenset[str]

    def _layout(self, layers: list[Layer], device: torch.device) -> None:
        """Called before each sampled forward pass: have per-layer buffers for ``layers`` on ``device`` (keep
        the current ones when the layers are the same, adopt a loaded checkpoint's when they match)."""
        raise NotImplementedError

    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> Any:
        """The statistic of one activation call (computed at once: in-place activations change their input), or
        ``None`` to ignore the call."""
        raise NotImplementedError

    def _accumulate(self, layer: int, kind: str, stat: Any) -> None:
        """Fold a measured statistic into the window's tallies (only for hidden activations)."""
        raise NotImplementedError


class _ActivationMode(TorchFunctionMode):
    def __init__(self, probe: ActivationProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.probe.watched_names and args and isinstance(args[0], Tensor):
            source = self.probe.sources.get(id(args[0]))
            if source is not None:
                kind = activation_kind(name, args, kwargs)
                if kind is not None:
                    self.probe.record(source[0], kind, args[0])  # before the call: in-place ops change args[0]
        return func(*args, **kwargs)


class ActivationProbe:
    """Watches the activations of one model's forward passes for its subscribers while any is attached."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[Layer] = []
        self._modules: list[tuple[nn.Module, int]] = []  # (module, index into layers)
        for raw_name, module in model.named_modules():
            if isinstance(module, (*_PRODUCERS, *_UNIT_PASSING_NORMS)) and (units := _units(module)) is not None:
                self._modules.append((module, len(self.layers)))
                self.layers.append(Layer(clean_name(raw_name), units[0], units[1]))
        self.subscribers: list[ActivationSubscriber] = []
        self.watched_names: set[str] = set()
        # id(tensor) -> (layer index, the tensor itself: held so the id cannot be reused while attached)
        self.sources: dict[int, tuple[int, Tensor]] = {}
        # measurements waiting for a later layer to show they were hidden: (subscriber, layer, kind, stat, calls)
        self._pending: list[tuple[ActivationSubscriber, int, str, Any, int]] = []
        self._layer_calls = 0
        self._handles: list[RemovableHandle] = []
        self._mode: _ActivationMode | None = None

    # -- subscription ------------------------------------------------------------------------------------------
    def subscribe(self, subscriber: ActivationSubscriber) -> None:
        if subscriber in self.subscribers:
            return
        self.subscribers.append(subscriber)
        self._update_watched()
        if self._mode is None:
            self._install()

    def unsubscribe(self, subscriber: ActivationSubscriber, commit: bool = True) -> None:
        """Stop watching for ``subscriber``; fold its hidden activations in (unless ``commit`` is False)."""
        if subscriber not in self.subscribers:
            return
        mine = [p for p in self._pending if p[0] is subscriber]
        self._pending = [p for p in self._pending if p[0] is not subscriber]
        if commit:
            for _, layer, kind, stat, calls in mine:
                if self._layer_calls > calls:  # a layer ran after it: a hidden activation, not the model's output
                    subscriber._accumulate(layer, kind, stat)
        self.subscribers.remove(subscriber)
        self._update_watched()
        if not self.subscribers:
            self._uninstall()

    def _update_watched(self) -> None:
        kinds = set().union(*(s.kinds for s in self.subscribers)) if self.subscribers else set()
        self.watched_names = (_RECTIFIERS if "relu" in kinds else set()) | (_SQUASHERS if kinds - {"relu"} else set())
        self.watched_names |= _SMOOTH if kinds & {"gelu", "silu"} else set()

    def record(self, layer: int, kind: str, pre_activation: Tensor) -> None:
        for subscriber in self.subscribers:
            if kind in subscriber.kinds:
                stat = subscriber._measure(layer, kind, pre_activation)
                if stat is not None:
                    self._pending.append((subscriber, layer, kind, stat, self._layer_calls))

    # -- hooks and mode --------------------------------------------------------------------------------------------
    def _install(self) -> None:
        self._layer_calls = 0
        for module, index in self._modules:
            layer = self.layers[index]
            is_norm = isinstance(module, _UNIT_PASSING_NORMS)
            self._handles.append(module.register_forward_hook(self._hook(index, layer, is_norm)))
        self._mode = _ActivationMode(self)
        self._mode.__enter__()

    def _uninstall(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.sources.clear()
        self._pending.clear()

    def _hook(self, index: int, layer: Layer, is_norm: bool) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._layer_calls += 1
            if not isinstance(output, Tensor):
                return
            source = index
            if is_norm and inputs and isinstance(inputs[0], Tensor):
                upstream = self.sources.get(id(inputs[0]))
                # conv -> bn -> relu: the units are the conv's channels, report them under the conv's name
                if upstream is not None and self.layers[upstream[0]].units == layer.units:
                    source = upstream[0]
            self.sources[id(output)] = (source, output)

        return hook


_PROBES: weakref.WeakKeyDictionary[nn.Module, ActivationProbe] = weakref.WeakKeyDictionary()


def compiled_modules(model: nn.Module) -> list[str]:
    """The parts of ``model`` that run under ``torch.compile``: a LightningModule handed to ``Trainer.fit``
    compiled, submodules wrapped by ``torch.compile(...)`` or compiled in place with ``module.compile()``."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = ["forward"] if getattr(model, "_compiler_ctx", None) else []
    for name, module in model.named_modules():
        if isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None:
            found.append(clean_name(name) if name else "(the model)")
    return found


def probe_for(model: nn.Module) -> ActivationProbe:
    """The one probe of ``model``, shared by every activation callback."""
    probe = _PROBES.get(model)
    if probe is None:
        probe = _PROBES[model] = ActivationProbe(model)
    return probe
