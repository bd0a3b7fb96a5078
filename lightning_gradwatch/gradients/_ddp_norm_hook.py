"""A DDP communication hook that measures each rank's local gradient norm before the all-reduce.

DDP hands each bucket of local (not yet averaged) gradients to the hook; the hook adds the bucket's squared norm
to a device accumulator, on steps that asked for it, and then all-reduces the bucket exactly as DDP's default
does. The result: the squared norm of this rank's own gradient, on device, at no extra pass over the gradients
beyond one reduction per bucket, and DDP's numerics unchanged.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

_REGISTERED_ATTR = "_lightning_gradwatch_norm_hook"


class LocalNormHookState:
    """What the hook reads and writes: whether to measure this step, and the running squared norm."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.active = False
        self.sq_norm: Tensor | None = None

    def reset(self, active: bool) -> None:
        self.active = active
        self.sq_norm = None


def local_norm_allreduce_hook(
    state: LocalNormHookState,
    bucket: dist.GradBucket,  # type: ignore[name-defined]  # exported at run time; the stubs lack it
) -> torch.futures.Future[Tensor]:
    """Add the squared norm of the bucket's local gradients to ``state`` (when active), then all-reduce as usual."""
    if state.active:
        buffer = bucket.buffer()  # this rank's summed gradients: DDP does not pre-divide them for a hook
        sq = torch.linalg.vector_norm(buffer, dtype=torch.float32).square()
        state.sq_norm = sq if state.sq_norm is None else state.sq_norm + sq
    return allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]


def register_local_norm_hook(model: DistributedDataParallel) -> LocalNormHookState | None:
    """Register the hook on ``model`` (once) and return its state; ``None`` if another hook holds the slot.

    DDP allows one communication hook per model: a user's hook (``DDPStrategy(ddp_comm_hook=...)``) wins.
    """
    existing = getattr(model, _REGISTERED_ATTR, None)
    if existing is not None:
        return existing
    if getattr(model, "_comm_hooks", None):
        return None  # a Python hook is registered already (a built-in one makes the registration below raise)
    state = LocalNormHookState()
    try:
        model.register_comm_hook(state, local_norm_allreduce_hook)
    except RuntimeError:  # "register_comm_hook ... can only be called once"
        return None
    setattr(model, _REGISTERED_ATTR, state)
    return state
