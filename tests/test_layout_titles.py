"""Per-layer chart titles read one way: the module a chart's layers share, then its first and last layer, or one
layer's name; a chart never mixes top-level modules (it did: ``hidden: 0 … 7`` beside ``hidden.8 … head``)."""

from __future__ import annotations

import re

import pytest

from lightning_gradwatch._layout import MAX_CHARTS, layer_charts

SHARED = re.compile(r"^(?P<module>[\w.]+): (?P<first>[\w.]+) … (?P<last>[\w.]+)$")


def example_mlp(depth: int) -> list[str]:
    """The layers of examples/train_mlp.py's DemoMLP: ``hidden.0`` ... and ``head``."""
    return [f"hidden.{i}" for i in range(depth)] + ["head"]


@pytest.mark.parametrize("depth", [4, 16])
def test_the_example_models_charts_read_one_way(depth: int) -> None:
    charts = layer_charts(example_mlp(depth))
    for title, names in charts:
        top = {n.split(".")[0] for n in names}
        assert len(top) == 1, (title, names)  # one top-level module per chart
        match = SHARED.match(title)
        if len(names) == 1:
            assert title == names[0]
        else:
            assert match, title
            module = match["module"]
            assert f"{module}.{match['first']}" == names[0] and f"{module}.{match['last']}" == names[-1]
    assert charts[-1] == ("head", ["head"])
    assert [t for t, _ in charts][:-1] == (["hidden: 0 … 3"] if depth == 4 else ["hidden: 0 … 7", "hidden: 8 … 15"])


def test_two_models_share_their_identical_charts() -> None:
    # in one log folder TensorBoard shows identical charts once: the head of both example models is one chart
    healthy, sick = dict(layer_charts(example_mlp(4))), dict(layer_charts(example_mlp(16)))
    assert healthy["head"] == sick["head"] == ["head"]


def test_plain_top_level_layers_share_a_chart_and_many_modules_still_fit() -> None:
    assert layer_charts(["fc1", "fc2", "head"]) == [("fc1 … head", ["fc1", "fc2", "head"])]
    assert [t for t, _ in layer_charts(["conv1", "conv2", "bn.0", "fc1"])] == ["conv1 … conv2", "bn.0", "fc1"]
    many = [f"block{i}.linear" for i in range(60)]  # more top-level modules than charts: they share
    assert len(layer_charts(many)) <= MAX_CHARTS
