"""Which modules feed which, recorded from one forward pass: the graph SetupCheck follows to tell a layer cut off
from the loss (by a ``.detach()`` or a ``no_grad`` block: its output still feeds a layer that learns) from a dead
end (a pooler a token classifier never reads: its output feeds nothing that learns)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_gradwatch._params import clean_name

_DEPTH = 3  # how deep outputs are searched for tensors: tuples, lists, dicts and dict-like model outputs


def _tensors(value: Any, depth: int = _DEPTH) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth - 1)


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (a DTensor, a meta or sparse tensor)
        return None


class Dataflow:
    """The modules of ``module`` that ran in one forward pass, and an edge A -> B whenever a tensor A returned (or
    a view or ``.detach()`` of it: the same storage) is an input of B. A tensor belongs to the innermost module that
    returned it first (a Sequential returning its last layer's output adds no edge). The outputs are held until
    :meth:`close`, so the allocator cannot hand their memory to another tensor in between.

    Recording starts at construction and stops at :meth:`close`; the graph stays readable after it.
    """

    def __init__(self, module: nn.Module) -> None:
        self.called: set[str] = set()
        self.edges: dict[str, set[str]] = {}
        self._producer: dict[int, str] = {}
        self._held: list[torch.Tensor] = []
        self._handles = []
        for name, child in module.named_modules():
            name = clean_name(name)
            self._handles.append(child.register_forward_pre_hook(self._before(name)))
            self._handles.append(child.register_forward_hook(self._after(name)))

    @property
    def recorded(self) -> bool:
        """Whether a forward pass ran since recording started."""
        return bool(self.called)

    def _before(self, name: str) -> Any:
        def hook(_: nn.Module, args: Any) -> None:
            self.called.add(name)
            for tensor in _tensors(args):
                source = self._producer.get(_storage(tensor) or 0)
                if source is not None and source != name:
                    self.edges.setdefault(source, set()).add(name)

        return hook

    def _after(self, name: str) -> Any:
        def hook(_: nn.Module, args: Any, output: Any) -> None:
            for tensor in _tensors(output):
                key = _storage(tensor)
                if key is not None and key not in self._producer:
                    self._producer[key] = name
                    self._held.append(tensor)

        return hook

    def close(self) -> None:
        """Stop recording and let the held outputs go."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._held, self._producer = [], [], {}

    def reaches(self, start: str, targets: set[str]) -> bool:
        """Whether a tensor ``start`` returned flows, module to module, into one of ``targets``."""
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in self.edges.get(frontier.pop(), ()):
                if nxt in targets:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return False
