"""Declared state: a callback's checkpointed values, each named once with its default.

A :class:`DeclaredState` is a dataclass whose fields are declared with :func:`scalar` (a 0-dim value: a Python float
on the CPU's host path, a float32 tensor on the device) or :func:`buffer` (a tensor whose shape the caller chooses,
on the device either way). From the declaration alone it is made fresh (:meth:`DeclaredState.fresh`), moved
(:meth:`DeclaredState.placed`), saved as CPU tensors (:meth:`DeclaredState.to_state`), restored where a saved value
fits (:meth:`DeclaredState.load`) and brought to the host as named floats (:meth:`DeclaredState.named`): no list of
names repeated in four methods, no ``values["worst_step"]`` read back from a positional list.

Example::

    @dataclass
    class Interval(DeclaredState):
        steps: Scalar = scalar(0.0)
        worst_norm: Scalar = scalar(-math.inf)

    interval = Interval.fresh(device, on_host=False)
    interval.steps = interval.steps + 1
    checkpoint["interval"] = interval.to_state()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from lightning_gradwatch.functional._scalars import Scalar

__all__ = ["DeclaredState", "buffer", "scalar"]

_KIND = "lightning_gradwatch_slot"
State = TypeVar("State", bound="DeclaredState")


def scalar(default: float = 0.0) -> Any:
    """A 0-dim slot starting at ``default``: a float on the host path, a float32 tensor on the device."""
    return dataclasses.field(default=default, metadata={_KIND: "scalar"})


def buffer(dtype: torch.dtype = torch.float32) -> Any:
    """A tensor slot of ``dtype``, zeros of the shape given to :meth:`DeclaredState.fresh`; on the device on both
    paths."""
    return dataclasses.field(default=None, metadata={_KIND: "buffer", "dtype": dtype})


def _placed(value: Scalar, device: torch.device, on_host: bool) -> Scalar:
    """``value`` as a float (the host path) or as a float32 tensor on ``device``."""
    if on_host:
        return float(value)
    if isinstance(value, Tensor):
        return value.to(device, torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)  # filled there: copying a host 0-dim would sync


@dataclasses.dataclass
class DeclaredState:
    """Base of a declared state: subclass it as a ``@dataclass`` whose fields are :func:`scalar` and :func:`buffer`
    slots. ``on_host`` says which path its scalars are on."""

    on_host: bool = dataclasses.field(default=False, kw_only=True)
    _scalars: ClassVar[tuple[str, ...]] = ()
    _buffers: ClassVar[dict[str, torch.dtype]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the fields are known once the dataclass decorator has run: read lazily, on first use
        cls._scalars, cls._buffers = (), {}

    @classmethod
    def _slots(cls) -> tuple[tuple[str, ...], dict[str, torch.dtype]]:
        if not cls._scalars and not cls._buffers:
            fields = [f for f in dataclasses.fields(cls) if _KIND in f.metadata]
            cls._scalars = tuple(f.name for f in fields if f.metadata[_KIND] == "scalar")
            cls._buffers = {f.name: f.metadata["dtype"] for f in fields if f.metadata[_KIND] == "buffer"}
        return cls._scalars, cls._buffers

    @classmethod
    def scalar_names(cls) -> tuple[str, ...]:
        """The scalar slots, in declaration order (the order :meth:`scalar_values` and :meth:`named` use)."""
        return cls._slots()[0]

    @classmethod
    def fresh(
        cls: type[State], device: torch.device, on_host: bool, shapes: dict[str, Sequence[int]] | None = None
    ) -> State:
        """Every slot at its default (``buffer`` slots: zeros of ``shapes[name]``), placed on ``device``."""
        scalars, buffers = cls._slots()
        defaults: dict[str, float] = {f.name: f.default for f in dataclasses.fields(cls) if f.name in scalars}  # type: ignore[misc]
        values: dict[str, Any] = {n: _placed(defaults[n], device, on_host) for n in scalars}
        for name, dtype in buffers.items():
            values[name] = torch.zeros(tuple((shapes or {}).get(name, ())), dtype=dtype, device=device)
        return cls(**values, on_host=on_host)

    def placed(self: State, device: torch.device, on_host: bool) -> State:
        """The same values on ``device``, with the scalars as floats or as tensors."""
        scalars, buffers = self._slots()
        values: dict[str, Any] = {n: _placed(getattr(self, n), device, on_host) for n in scalars}
        values.update({n: getattr(self, n).to(device) for n in buffers})
        return type(self)(**values, on_host=on_host)

    def scalar_values(self) -> list[Scalar]:
        return [getattr(self, n) for n in self._slots()[0]]

    def named(self, values: Sequence[float]) -> dict[str, float]:
        """The scalars' host ``values`` (in :meth:`scalar_names` order) by name."""
        return dict(zip(self.scalar_names(), values, strict=True))

    def to_state(self) -> dict[str, Tensor]:
        """Every slot as a CPU tensor (float32 scalars), for a checkpoint."""
        scalars, buffers = self._slots()
        state = {n: torch.as_tensor(getattr(self, n), dtype=torch.float32).detach().cpu().clone() for n in scalars}
        state.update({n: getattr(self, n).detach().cpu().clone() for n in buffers})
        return state

    def load(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's values where they fit: a one-element tensor for a scalar, a tensor of the same shape
        for a buffer (a ring buffer of another size is left at its zeros)."""
        scalars, buffers = self._slots()
        for name in scalars:
            saved, current = state.get(name), getattr(self, name)
            if isinstance(saved, Tensor) and saved.numel() == 1:
                device = current.device if isinstance(current, Tensor) else torch.device("cpu")
                setattr(self, name, _placed(saved.reshape(()), device, self.on_host))
        for name in buffers:
            saved, current = state.get(name), getattr(self, name)
            if isinstance(saved, Tensor) and saved.shape == current.shape:
                setattr(self, name, saved.to(device=current.device, dtype=current.dtype, copy=True))
