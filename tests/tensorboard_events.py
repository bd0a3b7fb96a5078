"""Read TensorBoard event files back: scalars, text and the custom-scalars layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

_EVERYTHING = {"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}


def load(logdir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance=_EVERYTHING)
    acc.Reload()
    return acc


def scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    acc = load(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def texts(logdir: str | Path) -> dict[str, list[tuple[int, str]]]:
    acc = load(logdir)
    out = {}
    for tag in acc.Tags()["tensors"]:
        if "/alerts/" in tag:
            out[tag.removesuffix("/text_summary")] = [
                (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)
            ]
    return out


def images(logdir: str | Path) -> dict[str, list[int]]:
    """The steps at which each image tag was written."""
    acc = load(logdir)
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def layouts(logdir: str | Path) -> list[dict[str, Any]]:
    """Every custom-scalars layout written to the run, as {category: {chart title: [regexes]}}."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = load(logdir)
    found = []
    for tag in acc.Tags()["tensors"]:
        if tag != "custom_scalars__config__":
            continue
        for event in acc.Tensors(tag):
            layout = layout_pb2.Layout()
            layout.ParseFromString(event.tensor_proto.string_val[0])
            found.append(
                {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}
            )
    return found


def histograms(logdir: str | Path) -> list[str]:
    return load(logdir).Tags()["histograms"]
