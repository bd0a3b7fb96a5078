"""The TensorBoard custom-scalars layout: per-layer charts split along the module tree, merged across callbacks.

TensorBoard reads one layout per run, so the callbacks' charts are merged into one, written once, from rank zero.
Categories come in a fixed order (gradients first, the guard last) whatever order the callbacks are listed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Category order in the Custom Scalars tab; categories not listed come before the guard, in callback order.
CATEGORY_ORDER = (
    "gradwatch: gradients",
    "gradwatch: training dynamics",
    "gradwatch: activations",
    "gradwatch: clipping",
    "gradwatch: geometry",
)
LAST_CATEGORY = "gradwatch: guard"

#: Lines per custom-scalars chart: about what TensorBoard's palette tells apart.
CHART_LINES = 10
#: Charts per metric: a larger model gets more lines per chart instead of more charts.
MAX_CHARTS = 24


def layer_charts(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Split layer names (in model order) into charts of related, consecutive layers: ``(title, names)`` each.

    Each top-level module keeps to its own charts, so every title reads the same way: the module the chart's layers
    share, then its first and last layer (``hidden: 0 … 7``, ``hidden: 8 … 15``), or a layer's own name
    (``head``); top-level layers that are not modules (``fc1``, ``fc2``) share a chart (``fc1 … fc2``). Within a
    module, layers are grouped by their path (``encoder.*`` apart from ``decoder.*``); a group with more lines than
    a chart holds is split at the next level down (``encoder.layers.0`` apart from ``encoder.layers.1``), and small
    neighbouring groups share a chart. Only a model with more than ``MAX_CHARTS`` top-level groups has them share
    charts. A chart holds at most ``max(CHART_LINES, ceil(n / MAX_CHARTS))`` lines, so no metric gets more than
    about ``MAX_CHARTS`` charts.
    """
    names = list(names)
    if not names:
        return []
    limit = max(CHART_LINES, math.ceil(len(names) / MAX_CHARTS))
    return [(_chart_title(chart), chart) for chart in _top_level(names, limit) or _split(names, 0, limit)]


def _split(group: list[str], depth: int, limit: int) -> list[list[str]]:
    """``group`` split by path into pieces of at most ``limit`` layers (a piece one layer long past the last level)."""
    if len(group) <= limit:
        return [group]
    if all(depth >= len(name.split(".")) for name in group):  # nothing left to split on (repeated names)
        return _pack([[name] for name in group], len(group), limit)
    children: list[list[str]] = []
    for name in group:  # consecutive runs sharing the path component at ``depth``
        parts = name.split(".")
        key = parts[depth] if depth < len(parts) else None
        if children and key is not None and children[-1][0].split(".")[depth : depth + 1] == [key]:
            children[-1].append(name)
        else:
            children.append([name])
    if len(children) == 1:
        return _split(group, depth + 1, limit)  # a prefix every layer here shares (``net.``): look one level down
    return _pack([piece for child in children for piece in _split(child, depth + 1, limit)], len(group), limit)


def _pack(pieces: list[list[str]], total: int, limit: int) -> list[list[str]]:
    """Neighbouring pieces joined into charts of about equal size, at most ``limit`` lines each."""
    # balanced: 21 layers make charts of 7, 7 and 7 rather than 10, 10 and 1
    target = math.ceil(total / math.ceil(total / limit))
    charts: list[list[str]] = []
    for piece in pieces:
        if charts and len(charts[-1]) + len(piece) <= target:
            charts[-1].extend(piece)
        else:
            charts.append(list(piece))
    return charts


def _top_level(group: list[str], limit: int) -> list[list[str]] | None:
    """Each top-level module's own charts, its top-level plain layers together; None where a model has one
    top-level module, or more groups than ``MAX_CHARTS``."""
    runs: list[list[str]] = []
    for name in group:  # consecutive runs of one top-level name
        if runs and runs[-1][0].split(".")[0] == name.split(".")[0]:
            runs[-1].append(name)
        else:
            runs.append([name])
    if len(runs) == 1:
        return None
    charts: list[list[str]] = []
    for run in runs:
        plain = all("." not in name for name in run)
        if plain and charts and all("." not in n for n in charts[-1]) and len(charts[-1]) + len(run) <= limit:
            charts[-1].extend(run)  # plain layers next to each other (fc1, fc2) share a chart
        else:
            charts.extend([run] if plain else _split(run, 0, limit))
    return charts if len(charts) <= MAX_CHARTS else None


def _chart_title(names: list[str]) -> str:
    """``net: 0 … 12`` for ``net.0`` to ``net.12``; ``proj … head`` when the layers share no module path."""
    if len(names) == 1:
        return names[0]
    paths = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    first, last = ".".join(paths[0][common:]), ".".join(paths[-1][common:])
    span = f"{first} … {last}"
    return f"{'.'.join(paths[0][:common])}: {span}" if common else span


def exact_tags(prefix: str, names: Iterable[str]) -> str:
    """A regex matching exactly the tags ``prefix + name`` for ``names``."""
    return f"^{re.escape(prefix)}(?:{'|'.join(re.escape(n) for n in names)})$"


def merge_layouts(layouts: Iterable[Mapping[str, Mapping[str, list[Any]]]]) -> dict[str, dict[str, list[Any]]]:
    """Merge custom-scalars layouts ``{category: {chart: ["Multiline", [regex, ...]]}}``; later charts of the
    same category and title add their regexes to the earlier ones."""
    merged: dict[str, dict[str, list[Any]]] = {}
    for layout in layouts:
        for category, charts in layout.items():
            target = merged.setdefault(category, {})
            for title, (kind, tags) in charts.items():
                if title in target:
                    target[title][1].extend(t for t in tags if t not in target[title][1])
                else:
                    target[title] = [kind, list(tags)]
    return merged


def ordered_layout(layout: Mapping[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
    """``layout`` with its categories in :data:`CATEGORY_ORDER`, others after them, the guard last; empty
    categories dropped."""

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        position, category = item
        if category in CATEGORY_ORDER:
            return (0, CATEGORY_ORDER.index(category))
        return (2, 0) if category == LAST_CATEGORY else (1, position)

    categories = sorted(enumerate(layout), key=rank)
    return {category: dict(layout[category]) for _, category in categories if layout[category]}
