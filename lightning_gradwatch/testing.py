"""Testing aid: count, on CPU, the operations that would make the host wait for the GPU.

Used by the test suite and ``benchmarks/overhead.py`` to hold every callback to its host-sync budget without a GPU;
useful too for checking one's own callbacks or LightningModule code.

On a GPU, reading a device tensor from Python (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ...) or
running an op whose output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ...)
blocks the host until the device catches up: a host-device sync. A CPU has no such sync to observe, but every
one of those operations passes through ``__torch_function__``, so a ``TorchFunctionMode`` sees each of them
in any Python code, ours, Lightning's or torch's. :class:`HostReadCounter` records them per training batch;
comparing a fit with a callback against the same fit without it gives the host reads the callback adds on
each step, the CPU stand-in for ``torch.cuda.set_sync_debug_mode`` (which ``benchmarks/overhead.py`` uses on a
GPU). Reads done inside a C++ kernel are invisible here; none of the per-step paths of this package have any.

Tensors made on the host stay on the host on a GPU too: a factory called without ``device=`` (``torch.tensor(
[...])``), and whatever is computed from such tensors alone. Reading those is free, so the counter tracks them
(an attribute on the tensor) and does not count their reads; copying a device tensor into one is a read, and
copying one to the device (``.to(device)``, ``copy_``) is counted too: from pageable memory that copy waits for the
stream, which ``torch.cuda.set_sync_debug_mode`` reports as a sync (Lightning's own copies, which pass
``non_blocking=True`` on a GPU but not on a CPU, are left out).
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_gradwatch import _step
from lightning_gradwatch._reporting import logs_this_step

__all__ = ["HostReadCounter"]

_READS_HOST = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.Tensor.nonzero,
    torch.Tensor.masked_select,
    torch.Tensor.unique,
    torch.Tensor.unique_consecutive,
    torch.nonzero,
    torch.masked_select,
    torch.unique,
    torch.unique_consecutive,
    torch.is_nonzero,
    torch.equal,
    torch.allclose,
}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


_HOST_MADE = "_gradwatch_host_made"


def _host_made(t: torch.Tensor) -> bool:
    return getattr(t, _HOST_MADE, False)


def _targets_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # on a CPU every tensor is already on the host: only an explicit "cpu" target is a transfer
    return any(a == "cpu" for a in (*args[1:], kwargs.get("device")) if isinstance(a, str))


def _host_reads(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor], upload: bool
) -> int:
    if func in (torch.tensor, torch.as_tensor):
        # torch.tensor([t1, t2, ...]) reads each element tensor to the host, one by one
        return sum(not _host_made(t) for t in inputs)
    if upload:
        return int(not _moved_by_lightning())
    return int(_is_host_read(func, args, kwargs, inputs))


_LIGHTNING = ("/lightning/", "/lightning_fabric/", "/lightning_utilities/", "/pytorch_lightning/")


def _moved_by_lightning() -> bool:
    """Lightning moves tensors (batches, logged values) with ``non_blocking=True`` on an accelerator but without it
    on a CPU, where the counter runs: its copies are no sync on a GPU."""
    frame = _caller()
    return frame is not None and any(part in frame.filename for part in _LIGHTNING)


def _is_upload(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]) -> bool:
    """A host tensor copied to the device without ``non_blocking``: from pageable memory the copy waits for the
    stream, a sync on a GPU (``torch.zeros(()).to(device)``; ``torch.zeros((), device=device)`` is none)."""
    positional_non_blocking = len(args) > 2 and args[-1] is True  # t.to(device, dtype, True), dst.copy_(src, True)
    if kwargs.get("non_blocking") or positional_non_blocking or not inputs:
        return False
    if func is torch.Tensor.to and _host_made(inputs[0]):
        target = next((a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))), None)
        return isinstance(target, torch.device) or (isinstance(target, str) and target != "cpu")
    if func is torch.Tensor.copy_ and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return not _host_made(args[0]) and _host_made(args[1])
    return False


def _is_host_read(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]) -> bool:
    if not inputs or all(_host_made(t) for t in inputs):
        return False  # nothing on the device to wait for
    if func in _READS_HOST:
        return True
    if func in _INDEXING and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        # a boolean mask picks a data-dependent number of elements
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if func is torch.Tensor.to:
        return _targets_host(args, kwargs)
    if func is torch.Tensor.copy_:
        return _host_made(args[0])  # device to host
    return False


def _makes_host_tensors(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]) -> bool:
    if func in (torch.Tensor.cpu, torch.Tensor.numpy) or (func is torch.Tensor.to and _targets_host(args, kwargs)):
        return True
    if func is torch.tensor:
        return kwargs.get("device") is None  # copies its data, wherever it was, to a new tensor
    if func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device"))):
        return False  # an explicit device: on a GPU run, this is where a host tensor goes to the device
    if inputs:
        return all(_host_made(t) for t in inputs)
    return kwargs.get("device") is None  # a factory: no device given means the host


class HostReadCounter(TorchFunctionMode):
    """While entered, records each host read made during a training batch (from the :meth:`callback`'s
    ``on_train_batch_start`` to the next batch or the end of the epoch), keyed by the optimizer step the batch
    belongs to (``trainer.global_step``: with gradient accumulation, its micro-batches add up).

    :attr:`reads` maps a step to the call sites of its reads; :attr:`logging_steps` holds the steps on which the
    Trainer logs (set by :meth:`callback`, which must be in the Trainer's callbacks).

    While entered, gradwatch takes its device path on the CPU too: the decisions it would take on the host where a
    read is free (e.g. skipping a multiplication by 1 when nothing is clipped) are taken on the device, as on a
    GPU, so what is counted is what a GPU run would sync.

    Example::

        counter = HostReadCounter()
        trainer = Trainer(accelerator="cpu", callbacks=[counter.callback(), MyCallback()])
        with counter:
            trainer.fit(model)
        print(counter.per_step())  # host reads per optimizer step
    """

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.reads: dict[int, list[str]] = defaultdict(list)
        self.steps: list[int] = []
        self.logging_steps: set[int] = set()
        self._device_path: AbstractContextManager[None] = nullcontext()

    def __enter__(self) -> HostReadCounter:
        self._device_path = _step.device_path()  # a fresh one each time: a counter may be entered again
        self._device_path.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._device_path.__exit__(*exc)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        upload = _is_upload(func, args, kwargs, inputs)
        if self.step is not None:
            for _ in range(_host_reads(func, args, kwargs, inputs, upload)):
                self.reads[self.step].append(_call_site(func))
        result = func(*args, **kwargs)
        if upload and result is inputs[0]:
            result = inputs[0].clone()  # on a GPU the copy is a new, device tensor: the host one stays host-made
        elif _makes_host_tensors(func, args, kwargs, inputs):
            for t in tree_flatten(result)[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                    setattr(t, _HOST_MADE, True)
        return result

    def callback(self) -> Callback:
        counter = self

        class _Steps(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                counter.step = trainer.global_step  # micro-batches of one optimizer step share it
                if not counter.steps or counter.steps[-1] != counter.step:
                    counter.steps.append(counter.step)
                if logs_this_step(trainer):
                    counter.logging_steps.add(counter.step)

            def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                counter.step = None  # reads at the end of an epoch or of the fit belong to no step

            def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                counter.step = None

        return _Steps()

    def per_step(self) -> dict[int, int]:
        return {step: len(self.reads.get(step, [])) for step in self.steps}


def _caller() -> traceback.FrameSummary | None:
    """The innermost frame of the code that called torch: outside torch, this module and any other
    TorchFunctionMode in between (the activation probe's)."""
    for frame in reversed(traceback.extract_stack()):
        outside = "/torch/" not in frame.filename and not frame.filename.endswith("testing.py")
        if outside and frame.name != "__torch_function__":
            return frame
    return None


def _call_site(func: Any) -> str:
    """Who read, for a failure message."""
    name = getattr(func, "__name__", repr(func))
    frame = _caller()
    return f"{name} at {frame.filename.rsplit('/', 2)[-2:]}:{frame.lineno} in {frame.name}" if frame else name
