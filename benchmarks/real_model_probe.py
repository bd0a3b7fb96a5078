"""Raw measurements of a training run, taken from the tensors themselves (not from gradwatch's callbacks), for
``benchmarks/calibrate_real_models.py``.

``GradProbe`` records the global gradient norm of every optimizer step (and, at a few steps, every layer's
gradient RMS); put one before ``GradWatch`` in the callback list to see the gradients before any clipping and
one after it to see what the optimizer gets. ``DeadUnitProbe`` records, on sampled training batches, which
units of every ReLU/ReLU6/Hardswish call had a live pre-activation (ReLU: > 0; Hardswish: > -3), per call site
(a module called twice per forward, like torchvision's ResNet blocks' ``relu``, gives two sites).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

# activation modules with a flat zero-gradient region, and the pre-activation bound below which a unit is dead
DEAD_BOUND: dict[type[nn.Module], float] = {nn.ReLU: 0.0, nn.ReLU6: 0.0, nn.Hardswish: -3.0}


class GradProbe(Callback):
    """Per-optimizer-step global gradient norm (``norms[optimizer index]``, ``inf`` for non-finite steps) and
    per-layer gradient RMS at ``layer_steps`` (``layer_rms[(optimizer index, step)] = [(layer, rms), ...]`` in
    module order, the depth order of a feed-forward net)."""

    def __init__(self, layer_steps: tuple[int, ...] = ()) -> None:
        self.layer_steps = set(layer_steps)
        self.norms: dict[int, list[Tensor]] = {}
        self.layer_rms: dict[tuple[int, int], list[tuple[str, float]]] = {}
        self._layers: list[tuple[str, list[nn.Parameter]]] | None = None
        self._steps: dict[int, int] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.norms.setdefault(index, []).append(norm.detach())
        step = self._steps.get(index, 0)
        self._steps[index] = step + 1
        if step in self.layer_steps:
            self.layer_rms[(index, step)] = self._layer_rms(pl_module, owned)

    def _layer_rms(self, module: nn.Module, owned: set[int]) -> list[tuple[str, float]]:
        if self._layers is None:
            self._layers = [
                (name, list(m.parameters(recurse=False)))
                for name, m in module.named_modules()
                if any(True for _ in m.parameters(recurse=False))
            ]
        rows = []
        for name, params in self._layers:
            grads = [p.grad.float() for p in params if id(p) in owned and p.grad is not None]
            if grads:
                squares = sum(float(g.pow(2).sum()) for g in grads)
                rows.append((name, (squares / sum(g.numel() for g in grads)) ** 0.5))
        return rows

    def norm_series(self, index: int = 0) -> list[float]:
        values = self.norms.get(index, [])
        return [v if v == v else float("inf") for v in torch.stack(values).tolist()] if values else []


class DeadUnitProbe(Callback):
    """Per call site of a ReLU/ReLU6/Hardswish module: on every ``sample_every``-th training batch, which units
    (channel dim 1 of 4-D inputs, else the last dim) had a live pre-activation anywhere in the batch.

    ``alive[site]`` is a list of boolean masks, one per sampled batch."""

    def __init__(self, sample_every: int = 10) -> None:
        self.sample_every = sample_every
        self.alive: dict[str, list[Tensor]] = {}
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._active = False
        self._batches = 0  # training batches seen (batch_idx restarts every epoch)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            bound = next((b for cls, b in DEAD_BOUND.items() if type(module) is cls), None)
            if bound is not None:
                self._handles.append(module.register_forward_pre_hook(self._hook(name, bound)))

    def _hook(self, name: str, bound: float) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._active or not args or not isinstance(args[0], Tensor):
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            x = args[0].detach()  # a pre-hook sees the input before an in-place rectifier overwrites it
            unit_dim = 1 if x.dim() == 4 else x.dim() - 1
            reduce = [d for d in range(x.dim()) if d != unit_dim]
            live = (x.amax(dim=reduce) if reduce else x) > bound
            site = name if call == 0 else f"{name}#{call}"
            self.alive.setdefault(site, []).append(live.cpu())

        return hook

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._active = self._batches % self.sample_every == 0
        self._batches += 1
        self._calls.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._active = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def site_summary(self, site: str, window: int = 10) -> dict[str, Any]:
        """Dead fraction per window of ``window`` samples (the detector's default), the fraction of units never
        alive in the whole run, and of units alive in the first window but dead in the last (died during
        training) or the reverse (revived)."""
        masks = torch.stack(self.alive[site])
        windows = [masks[i : i + window].any(dim=0) for i in range(0, len(masks) - window + 1, window)]
        if not windows:
            windows = [masks.any(dim=0)]
        first, last = windows[0], windows[-1]
        return {
            "units": masks.shape[1],
            "window_dead": [float((~w).float().mean()) for w in windows],
            "batch_dead": [float((~m).float().mean()) for m in masks],
            "never_alive": float((~masks.any(dim=0)).float().mean()),
            "died": float((first & ~last).float().mean()),
            "revived": float((~first & last).float().mean()),
        }
