"""What GradientGeometry probes, and how: finding a model's blocks and running the probe passes (no Lightning).

Blocks (unless named by the user) are found by one of two rules, whichever finds more (a tie goes to the first):

1. Repeated blocks: the module class with the most instances among modules that have submodules (containers
   such as ``nn.Sequential`` do not count), at least two; instances nested in another are dropped. A transformer's
   layers, a ResNet's residual blocks, a residual MLP's blocks.
2. Stages of a container: in the ``nn.Sequential`` or ``nn.ModuleList`` with the most of them, each child with
   parameters starts a stage, except normalisation layers, which stay with the stage before them; children
   without parameters (activations, dropout, pooling) belong to the stage before them. A plain MLP
   ``nn.Sequential(Linear, ReLU, Linear, ReLU, ...)`` has one stage per Linear and its ReLU.

The probe perturbs the input of the first block, and block ``i`` is the stretch of the forward pass from block
``i``'s input to block ``i + 1``'s (for the last, to its output, or to the container's output for stages): what
the parent does between blocks (an activation written as a function, a residual sum) belongs to a block too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradwatch._params import clean_name
from lightning_gradwatch._probe_batch import eval_mode
from lightning_gradwatch.activations._probe import ActivationSubscriber, Layer, probe_for
from lightning_gradwatch.functional.geometry import gradient_coherence, relative_perturbation, segment_spectrum

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Blocks:
    """The blocks of a model: their names, the modules whose inputs start them, the module whose output ends the
    last one, and the rule that found them (for messages)."""

    names: list[str]
    starts: list[nn.Module]
    end: nn.Module
    rule: str


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _repeated(model: nn.Module) -> Blocks | None:
    counts: Counter[type] = Counter()
    for module in model.modules():
        if module is not model and not isinstance(module, _CONTAINERS) and next(module.children(), None):
            counts[type(module)] += 1
    if not counts or max(counts.values()) < 2:
        return None
    best = max(counts.values())
    cls = next(c for c in counts if counts[c] == best)  # the first class (outermost) among the most repeated
    names: list[str] = []
    starts: list[nn.Module] = []
    for name, module in model.named_modules():
        if type(module) is cls and not any(name.startswith(f"{n}.") for n in names):
            names.append(name)
            starts.append(module)
    if len(starts) < 2:
        return None
    return Blocks([clean_name(n) for n in names], starts, starts[-1], f"repeated {cls.__name__} blocks")


def _stages(model: nn.Module) -> Blocks | None:
    best: Blocks | None = None
    for name, container in model.named_modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        names: list[str] = []
        starts: list[nn.Module] = []
        for child_name, child in container.named_children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                continue  # never called itself: its parent calls its members
            if _has_params(child) and not (isinstance(child, _NORMS) and starts):
                names.append(clean_name(f"{name}.{child_name}" if name else child_name))
                starts.append(child)
        if len(starts) >= 2 and (best is None or len(starts) > len(best.starts)):
            end = container if isinstance(container, nn.Sequential) else list(container.children())[-1]
            best = Blocks(names, starts, end, f"stages of {clean_name(name) or 'the model'}")
    return best


def find_blocks(model: nn.Module, names: list[str] | None = None) -> Blocks | None:
    """The blocks of ``model``: the modules ``names`` (in that order) if given, else by the rules above; ``None``
    when no rule finds two blocks.

    Raises:
        ValueError: a name in ``names`` is not a module of ``model``.
    """
    if names is not None:
        by_name = {clean_name(n): m for n, m in model.named_modules() if n}
        missing = [n for n in names if n not in by_name]
        if missing:
            known = ", ".join(list(by_name)[:20])
            raise ValueError(f"`blocks` names modules the model does not have: {missing}. Its modules: {known}, ...")
        starts = [by_name[n] for n in names]
        return Blocks(list(names), starts, starts[-1], "the `blocks` argument") if starts else None
    repeated, stages = _repeated(model), _stages(model)
    if repeated is None or (stages is not None and len(stages.starts) > len(repeated.starts)):
        return stages
    return repeated


def output_tensor(out: Any) -> Tensor | None:
    """The tensor a model's output stands for: itself, ``.logits`` / ``["logits"]``, or the first tensor inside."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else []
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    return next((v for v in values if isinstance(v, Tensor) and v.is_floating_point()), None)


def _input_slot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | str, Tensor] | None:
    """Where a block's input is among its call arguments: the first floating tensor, positional or keyword."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return i, a
    for k, a in kwargs.items():
        if isinstance(a, Tensor) and a.is_floating_point():
            return k, a
    return None


@dataclass
class _Pass:
    output: Tensor | None
    inputs: list[Tensor | None]
    end: Tensor | None


def _run_pass(
    blocks: Blocks,
    call: Callable[[], Any],
    perturb: Callable[[Tensor], Tensor | None],
    context: AbstractContextManager[Any] | None = None,
) -> _Pass:
    """One forward pass with the first block's input cut from the graph above it (and perturbed by ``perturb``)
    and every block's input and the last block's output kept."""
    inputs: list[Tensor | None] = [None] * len(blocks.starts)
    end: list[Tensor | None] = [None]

    def pre_hook(index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if inputs[index] is not None:
                return None  # a block called again (shared weights): its first call stands for it
            slot = _input_slot(args, kwargs)
            if slot is None:
                return None
            key, x = slot
            if index == 0:
                delta = perturb(x)
                site = x.detach() if delta is None else (x.detach() + delta)
                x = site.requires_grad_(True)  # a leaf: the probe's backward stops here
                if isinstance(key, int):
                    args = (*args[:key], x, *args[key + 1 :])
                else:
                    kwargs = {**kwargs, key: x}
            inputs[index] = x
            return args, kwargs

        return hook

    def end_hook(module: nn.Module, args: Any, output: Any) -> None:
        if end[0] is None:
            end[0] = output_tensor(output)

    handles = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(blocks.starts)]
    handles.append(blocks.end.register_forward_hook(end_hook))
    try:
        with context if context is not None else nullcontext():
            output = output_tensor(call())
    finally:
        for handle in handles:
            handle.remove()
    return _Pass(output, inputs, end[0])


def _input_grads(run: _Pass, cotangent: Tensor | None, retain: bool) -> list[Tensor | None]:
    present = [x for x in run.inputs if x is not None and x.requires_grad]
    if run.output is None or cotangent is None or not present or not run.output.requires_grad:
        return [None] * len(run.inputs)
    projection = (run.output.to(torch.float32) * cotangent).sum()
    grads = iter(torch.autograd.grad(projection, present, allow_unused=True, retain_graph=retain))
    return [next(grads) if x is not None and x.requires_grad else None for x in run.inputs]


@dataclass
class ProbeResult:
    """One probe's measurements, per block, as float32 device tensors (``NaN`` where there is nothing to measure:
    a block the forward pass did not reach, a block that changes its input's shape has no spectrum)."""

    coherence: Tensor
    gain: Tensor
    sigma_max: Tensor
    square: list[bool]  # whether each block keeps its input's shape (known on the host: shapes need no sync)


def probe_geometry(
    model: nn.Module,
    blocks: Blocks,
    call: Callable[[], Any],
    *,
    radius: float,
    power_iterations: int,
    generator: torch.Generator,
    clean_forward_context: AbstractContextManager[Any] | None = None,
) -> ProbeResult:
    """Measure gradient coherence at every block's input and each shape-keeping block's Jacobian spectrum.

    ``call()`` runs ``model`` on the probe batch. Two passes, in eval mode: one with the first block's input moved
    by ``radius`` (relative, along a random direction), then a clean one (inside ``clean_forward_context``, e.g.
    an activation probe) whose graph also serves the spectra. Both backward passes take the gradient of the same
    random projection of the output, with respect to the block inputs only: no parameter's ``.grad`` is touched.
    The math attention kernel is used throughout, the fused ones having no double backward.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def perturb(x: Tensor) -> Tensor:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return relative_perturbation(x, direction, radius)

    n = len(blocks.starts)
    with eval_mode(model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        moved = _run_pass(blocks, call, perturb)
        cotangent = None
        if moved.output is not None:
            out = moved.output
            cotangent = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
        moved_grads = _input_grads(moved, cotangent, retain=False)
        del moved
        clean = _run_pass(blocks, call, lambda x: None, clean_forward_context)
        clean_grads = _input_grads(clean, cotangent, retain=True)
        device = next((g.device for g in clean_grads if g is not None), None) or torch.device("cpu")
        nan = torch.full((), float("nan"), device=device)
        coherence = [
            gradient_coherence(a, b) if a is not None and b is not None else nan
            for a, b in zip(clean_grads, moved_grads, strict=True)
        ]
        gains, sigmas, square = [], [], []
        for i, x in enumerate(clean.inputs):
            y = clean.inputs[i + 1] if i + 1 < n else clean.end
            keeps_shape = x is not None and y is not None and x.requires_grad and y.requires_grad
            keeps_shape = keeps_shape and x.shape == y.shape  # type: ignore[union-attr]  # both tensors here
            square.append(bool(keeps_shape))
            if keeps_shape and x is not None and y is not None:
                gain, sigma = segment_spectrum(y, x, power_iterations, generator)
            else:
                gain = sigma = nan
            gains.append(gain.to(device))
            sigmas.append(sigma.to(device))
        del clean
    return ProbeResult(torch.stack(coherence), torch.stack(gains), torch.stack(sigmas), square)


#: Activation values kept per layer for its histogram (a strided sample of the probe batch's).
HISTOGRAM_VALUES = 4096
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}


class ActivationSample(ActivationSubscriber):
    """A sample of each layer's activation outputs in one forward pass, from the model's shared activation probe
    (the hooks and mode of DeadNeuronCallback/SaturationCallback: no second set)."""

    kinds = frozenset(_ACTIVATIONS)

    def __init__(self) -> None:
        self._layers: list[Layer] = []
        self._values: dict[int, list[Tensor]] = {}

    @contextmanager
    def subscribed(self, model: nn.Module) -> Iterator[None]:
        """Watch ``model``'s activations inside (one forward pass)."""
        probe = probe_for(model)
        self._layout(probe.layers, torch.device("cpu"))
        probe.subscribe(self)
        try:
            yield
        except BaseException:
            probe.unsubscribe(self, commit=False)
            raise
        probe.unsubscribe(self)

    def take(self) -> list[tuple[str, Tensor]]:
        """``(layer, sampled outputs)`` per layer, in model order; the sample is emptied."""
        values, self._values = self._values, {}
        return [(self._layers[i].name, torch.cat(chunks)) for i, chunks in sorted(values.items())]

    def _layout(self, layers: list[Layer], device: torch.device) -> None:
        self._layers, self._values = layers, {}

    def _measure(self, layer: int, kind: str, pre_activation: Tensor) -> Tensor:
        flat = pre_activation.detach().reshape(-1)
        stride = max(1, math.ceil(flat.numel() / HISTOGRAM_VALUES))
        return _ACTIVATIONS[kind](flat[::stride].to(torch.float32))  # the activation's output, sampled

    def _accumulate(self, layer: int, kind: str, stat: Tensor) -> None:
        self._values.setdefault(layer, []).append(stat)
