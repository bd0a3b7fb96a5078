"""One optimizer step's final gradients, and the one pass over them that every gradwatch callback shares.

The dispatcher (:class:`~lightning_gradwatch.core.callback.GradwatchCallback`) builds a :class:`StepGradients` per
optimizer step and hands it to each callback in turn: NaNGuard's finiteness screen, GradientNormLogger's global and
per-layer norms and AdaptiveClipping's global norm all come from the same per-parameter norms, computed once per
step and norm type with ``foreach`` kernels, on the device, without a host sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch._distributed import partial_dims, sum_partials
from lightning_gradwatch._params import OptimizerParams, local_tensor
from lightning_gradwatch._precision import grad_scaler, grad_unscale_factor, scaler_found_inf
from lightning_gradwatch.functional.norms import tensor_norms, total_norm

#: On a CPU a host read is free, so decisions may be taken on the host; :func:`device_path` turns that off within
#: its block (``testing.HostReadCounter`` while it counts), so that the CPU runs the path a GPU would.
_DECIDE_ON_HOST: ContextVar[bool] = ContextVar("lightning_gradwatch_decide_on_host", default=True)


def host_is_free(device: torch.device) -> bool:
    """Whether a value on ``device`` can be read without a device sync (a CPU), so decisions may be taken on the
    host."""
    return device.type == "cpu" and _DECIDE_ON_HOST.get()


@contextmanager
def device_path(enabled: bool = True) -> Iterator[None]:
    """Within this block gradwatch takes, on a CPU too, the path it takes on a GPU: per-step state as tensors and
    every decision on the device, with no host read (``enabled=False``: the CPU's host path, the default). For
    tests that hold both paths to the same decisions, and for counting what a GPU run would sync. Nestable; local
    to the thread (a ``ContextVar``), restored on leaving."""
    token = _DECIDE_ON_HOST.set(not enabled)
    try:
        yield
    finally:
        _DECIDE_ON_HOST.reset(token)


class StepGradients:
    """The gradients an optimizer is about to apply (after accumulation and the DDP all-reduce, before clipping).

    Args:
        optimizer: the optimizer about to step.
        index: the optimizer's parameters (model order), shared by every callback.
        unscale: ``1 / loss scale`` when the gradients are still scaled (fused optimizers under fp16).
        found_inf: the GradScaler's overflow flag for this step (a device tensor), if known.
        has_scaler: a GradScaler is active (16-mixed).
        repeat: another evaluation of an optimizer step already seen (a closure optimizer such as LBFGS evaluates
            its closure several times per step): callbacks still act on the gradients but do not count a new step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        index: OptimizerParams,
        unscale: Tensor | None = None,
        found_inf: Tensor | None = None,
        has_scaler: bool = False,
        repeat: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.index = index
        self.unscale = unscale
        self.found_inf = found_inf
        self.has_scaler = has_scaler
        self.repeat = repeat
        self.grads: list[Tensor] = []
        self.positions: list[int] = []  # the index in ``index.params`` of each gradient in ``grads``
        # gradients that hold summands along some mesh dimension (DTensor ``Partial``): k in ``grads`` -> dims
        self._partials: dict[int, list[tuple[Any, Any]]] = {}
        dtensors = index.has_dtensors
        for i, p in enumerate(index.params):
            if p.grad is not None:
                if dtensors:
                    dims = partial_dims(p.grad)
                    if dims:
                        self._partials[len(self.grads)] = dims
                self.grads.append(local_tensor(p.grad))
                self.positions.append(i)
        self._summed: list[Tensor] | None = None
        self.dropped = False
        self._norms: dict[float, Tensor] = {}
        self._global_norms: dict[float, Tensor] = {}
        self._host_norms: dict[float, list[float]] = {}
        self._position_index: Tensor | None = None

    @classmethod
    def of(
        cls, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, index: OptimizerParams, repeat: bool = False
    ) -> StepGradients:
        """The step as the Trainer's precision leaves it in ``on_before_optimizer_step``."""
        return cls(
            optimizer,
            index,
            unscale=grad_unscale_factor(trainer, optimizer),
            found_inf=scaler_found_inf(trainer, optimizer),
            has_scaler=grad_scaler(trainer) is not None,
            repeat=repeat,
        )

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.index.params

    @property
    def device(self) -> torch.device:
        return self.grads[0].device if self.grads else torch.device("cpu")

    @property
    def host_is_free(self) -> bool:
        """True when the gradients live on the CPU: reading a value there costs no device sync, so a decision may
        be taken on the host (e.g. skip a multiplication by 1)."""
        return host_is_free(self.device)

    def param_norms(self, norm_type: float = 2.0) -> Tensor:
        """The ``norm_type``-norm of each parameter's gradient (unscaled; the full tensor's, reduced over shards),
        float32 on the device, 0 for a parameter without a gradient. Computed once per step and norm type."""
        norms = self._norms.get(norm_type)
        if norms is None:
            norms = self._per_param(tensor_norms(self._norm_inputs(), norm_type))
            # over each parameter's sharded mesh dimensions: collectives, every rank asks in the same order
            norms = self.index.reduction.norms(norms, norm_type)
            if self.unscale is not None:
                norms = norms * self.unscale.to(norms.device)
            self._norms[norm_type] = norms
        return norms

    def weight_norms(self, norm_type: float = 2.0) -> Tensor:
        """The ``norm_type``-norm of each parameter with a gradient this step (0 for the others), like
        :meth:`param_norms`; not cached: only logging steps need it."""
        weights = [local_tensor(self.index.params[i].detach()) for i in self.positions]
        norms = self._per_param(tensor_norms(weights, norm_type))
        return self.index.reduction.norms(norms, norm_type)

    def nonzero_counts(self) -> Tensor:
        """The number of non-zero gradient elements of each parameter (0 without a gradient), float32, summed over
        shards; one ``foreach`` pass (the 0-"norm"), for logging steps."""
        counts = self._per_param(tensor_norms(self._norm_inputs(), 0.0))
        return self.index.reduction.sum(counts)

    def global_norm(self, norm_type: float = 2.0) -> Tensor:
        """The norm of all gradients together (0-dim, on the device), from :meth:`param_norms`; once per step."""
        norm = self._global_norms.get(norm_type)
        if norm is None:
            norm = self._global_norms[norm_type] = total_norm(self.param_norms(norm_type), norm_type)
        return norm

    def param_norms_on_host(self, norm_type: float = 2.0) -> list[float]:
        """:meth:`param_norms` as Python floats, read once per step: only where :attr:`host_is_free`."""
        norms = self._host_norms.get(norm_type)
        if norms is None:
            norms = self._host_norms[norm_type] = self.param_norms(norm_type).tolist()
        return norms

    def gradients_changed(self) -> None:
        """Forget this step's norms: a callback rescaled the gradients in place (clipping), so a later callback
        that asks takes them afresh."""
        self._norms.clear()
        self._global_norms.clear()
        self._host_norms.clear()
        self._summed = None

    def has_norms(self, norm_type: float = 2.0) -> bool:
        """Whether :meth:`param_norms` was already computed this step (reusing it is free)."""
        return norm_type in self._norms

    def drop(self) -> None:
        """Drop this update: torch optimizers skip parameters whose ``grad`` is ``None`` (no update, momentum and
        Adam moments untouched). Later callbacks see no gradients."""
        for p in self.index.params:
            p.grad = None
        self.grads, self.positions = [], []
        self._partials, self._summed = {}, None
        self.dropped = True

    def _norm_inputs(self) -> list[Tensor]:
        """:attr:`grads` as norms must see them: a gradient holding summands (``Partial``) summed first, in a copy
        (one collective per mesh group for all such gradients; the gradients themselves are left as they are)."""
        if not self._partials:
            return self.grads
        if self._summed is None:
            ks = sorted(self._partials)
            summed = sum_partials([self.grads[k] for k in ks], [self._partials[k] for k in ks])
            self._summed = list(self.grads)
            for k, t in zip(ks, summed, strict=True):
                self._summed[k] = t
        return self._summed

    def _per_param(self, local: Tensor) -> Tensor:
        """``local`` (one value per gradient in :attr:`grads`) spread over every parameter, 0 where none."""
        if len(self.positions) == len(self.index.params):
            return local
        full = torch.zeros(len(self.index.params), dtype=torch.float32, device=local.device)
        if self.positions:
            full.index_copy_(0, self._positions_on(local.device), local)
        return full

    def _positions_on(self, device: torch.device) -> Tensor:
        # made once per step and only when some gradient is missing: the usual step needs no index at all
        if self._position_index is None or self._position_index.device != device:
            self._position_index = self.index.position_index(tuple(self.positions), device)
        return self._position_index
