"""What the per-layer charts show: every layer, the layers the ``layers`` patterns choose, or one series per
repeated block (a transformer layer, a ResNet block), within a budget of series per metric. Host-side and pure.

Charting never changes what is judged: alerts are decided on the exact layers, and name them; a plan only decides
which series reach the logger and how the exact layers' values combine into a block's.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: At most this many per-layer series per metric by default; past it the layers are charted per block.
DEFAULT_MAX_SERIES = 64
GROUPINGS = ("module", "parameter", "block")


def check_patterns_syntax(patterns: Sequence[str] | None) -> list[str] | None:
    """``layers`` as given: ``None`` (every layer) or a list of ``fnmatch`` patterns, ``"!pattern"`` to leave out.

    Raises:
        ValueError: not a list of non-empty strings.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) and p.strip("!") for p in patterns):
        raise ValueError(
            f"`layers` must be a list of layer-name patterns (fnmatch, '!pattern' to leave one out), got {patterns!r}."
        )
    return list(patterns)


def charted(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether the layer ``name`` is charted under ``patterns``: it matches an include pattern (or there is none)
    and no ``!`` exclude pattern."""
    if not patterns:
        return True
    includes = [p for p in patterns if not p.startswith("!")]
    excludes = [p[1:] for p in patterns if p.startswith("!")]
    if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in excludes)


def block_of(layer: str, blocks: Sequence[str]) -> str:
    """The block ``layer`` belongs to (the block whose name is ``layer`` or a prefix of it), else ``layer``."""
    for block in blocks:
        if layer == block or layer.startswith(f"{block}."):
            return block
    return layer


@dataclass(frozen=True)
class ChartPlan:
    """The series charted: ``names[s]`` combines the exact layers ``members[s]`` (indexes into the layer list the
    plan was made for). ``grouped``: some series hold more than one layer."""

    names: list[str]
    members: list[list[int]]
    grouped: bool

    def norms(self, values: Sequence[float], norm_type: float) -> list[float]:
        """Each series' norm from its layers' norms: the p-norm of the p-norms (root-sum-of-squares for p=2)."""
        return [combine_norms([values[i] for i in m], norm_type) for m in self.members]

    def weighted(self, values: Sequence[float], weights: Sequence[float]) -> list[float]:
        """Each series' ``weights``-weighted mean of its layers' ``values`` (a fraction of elements, by numel)."""
        out = []
        for m in self.members:
            total = sum(weights[i] for i in m)
            out.append(sum(values[i] * weights[i] for i in m) / total if total > 0 else 0.0)
        return out

    def ratios(self, numerators: Sequence[float], denominators: Sequence[float], norm_type: float) -> list[float]:
        """Each series' ratio of combined norms (``||grad|| / ||weight||`` over the whole block)."""
        out = []
        for m in self.members:
            den = combine_norms([denominators[i] for i in m], norm_type)
            out.append(combine_norms([numerators[i] for i in m], norm_type) / max(den, 1e-12))
        return out


def combine_norms(norms: Sequence[float], norm_type: float) -> float:
    if not norms:
        return 0.0
    if math.isinf(norm_type):
        return max(norms)
    return sum(n**norm_type for n in norms) ** (1.0 / norm_type)


def plan_charts(
    layers: Sequence[str],
    patterns: Sequence[str] | None,
    group_by: str,
    blocks: Sequence[str],
    max_series: int | None,
) -> tuple[ChartPlan, str | None]:
    """The plan for ``layers`` (exact layer names, in order), and a sentence to say once when it grouped on its
    own: ``group_by="block"`` charts one series per block; otherwise the layers the patterns choose, grouped per
    block when there are more than ``max_series`` of them (and blocks to group into)."""
    chosen = [i for i, name in enumerate(layers) if charted(name, patterns)]
    by_block = group_by == "block"
    note = None
    if not by_block and max_series is not None and len(chosen) > max_series and blocks:
        by_block = True
        note = (
            f"{len(chosen)} layers is more than max_series={max_series} per-layer series per metric: they are charted "
            f"per block ({len(blocks)} blocks; alerts still name the exact layer). Pass layers=[...] to choose, "
            "group_by='block' to say so, or max_series=None for every layer."
        )
    if not by_block:
        return ChartPlan([layers[i] for i in chosen], [[i] for i in chosen], False), None
    names: list[str] = []
    members: dict[str, list[int]] = {}
    for i in chosen:
        series = block_of(layers[i], blocks)
        if series not in members:
            names.append(series)
            members[series] = []
        members[series].append(i)
    plan = ChartPlan(names, [members[n] for n in names], any(len(m) > 1 for m in members.values()))
    if note is not None and max_series is not None and len(names) > max_series:
        note += f" That is still {len(names)} series: pass layers=[...] to chart fewer."
    return plan, note
