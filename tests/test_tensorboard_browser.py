"""TensorBoard, looked at: train two small runs with GradientNormLogger, serve them with a real TensorBoard on
127.0.0.1, open the dashboards in headless Chromium and check what a user would see.

Needs Debian's ``chromium`` (``.ci/install-chromium``; CI installs it); skipped without it. Set
``GRADWATCH_SCREENSHOT=docs/tensorboard-custom-scalars.png`` to also write the README's screenshot
(``python docs/make_screenshot.py`` does that).
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gradwatch import GradientNormLogger
from tests import tensorboard_events
from tests.browser import Chromium, find_chromium, page_script, tensorboard_server
from tests.models import Classifier, mlp, trainer_kwargs

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (Debian package `chromium`; see .ci/install-chromium)"
)

CATEGORY = "gradwatch: gradients"
HEALTHY, SICK = "relu_mlp_3_layers", "sigmoid_mlp_20_layers"
# The sick run's layout: its 21 layers (net.0 ... net.40, all in one attribute) in three charts of seven per metric.
SPANS = ("net: 0 … 12", "net: 14 … 26", "net: 28 … 40")
EXPECTED_CHARTS = {"global gradient norm"} | {
    f"{m}: {s}" for m in ("gradient norm", "grad/weight ratio") for s in SPANS
}
# On the page TensorBoard merges both runs' layouts (the healthy run adds "net: 0 … 6"), and each chart draws its
# layers from both runs: net.0 ... net.6 exist in both, net.8 and up in the sick run only.
LINES_PER_SPAN = {"net: 0 … 6": 4 + 4, "net: 0 … 12": 4 + 7, "net: 14 … 26": 7, "net: 28 … 40": 7}
ON_PAGE = {"global gradient norm": 2} | {
    f"{m}: {s}": n for m in ("gradient norm", "grad/weight ratio") for s, n in LINES_PER_SPAN.items()
}
STEPS = 30
RENDER_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs side by side: a healthy ReLU MLP and a 20-layer sigmoid MLP whose gradients vanish."""
    root = tmp_path_factory.mktemp("tensorboard")
    for run, net_factory in ((HEALTHY, lambda: mlp(depth=3)), (SICK, lambda: mlp(depth=20, act=nn.Sigmoid))):
        torch.manual_seed(0)
        callback = GradientNormLogger(log_every_n_steps=1, histogram_every_n_steps=5, gradient_flow_every_n_steps=10)
        logger = pl.loggers.TensorBoardLogger(str(root), name="", version=run)
        trainer = pl.Trainer(**trainer_kwargs(root, max_steps=STEPS, callbacks=[callback], logger=logger))
        trainer.fit(Classifier(net_factory()))
        kinds = {a.kind for a in callback.alerts}
        assert kinds == ({"vanishing_gradient"} if run == SICK else set()), (run, callback.alerts)
    return root


@pytest.fixture(scope="module")
def page(logdir: Path) -> Iterator[tuple[str, Chromium]]:
    """A TensorBoard server on the runs and a headless Chromium page; both stopped at the end."""
    with tensorboard_server(logdir) as base, Chromium(width=1280, height=800) as browser:
        yield base, browser


def _open(page: tuple[str, Chromium], dashboard: str) -> Chromium:
    base, browser = page
    browser.navigate(f"{base}/#{dashboard}")
    return browser


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", png[16:24])


# For every custom-scalars chart card: its title, the category it sits in, and how many data points its
# longest drawn line has (Plottable draws each series as an SVG <path class="line">; "M x,y L x,y L ...").
_CUSTOM_SCALAR_CARDS = page_script(
    """
const dashboard = deepAll(document, 'tf-custom-scalar-dashboard')[0];
if (!dashboard) return null;
const categories = deepAll(dashboard, 'tf-category-paginated-view').map(view => ({
  name: view.category ? view.category.name : null,
  open: view.opened,
  cards: deepAll(view, 'tf-custom-scalar-multi-line-chart-card').map(card => ({
    title: card.title,
    points: Math.max(0, ...deepAll(card, 'path.line').map(p => (p.getAttribute('d') || '').split('L').length)),
    lines: deepAll(card, 'path.line').filter(p => (p.getAttribute('d') || '').includes('L')).length,
  })),
}));
const rendered = categories.some(c => c.cards.length && c.cards.every(card => card.points >= MIN_POINTS));
return {rendered, categories, text: deepText(dashboard)};
""".replace("MIN_POINTS", str(STEPS))
)


_LOG_SCALE_PER_LAYER_CHARTS = page_script(
    """
const cards = deepAll(document, 'tf-custom-scalar-multi-line-chart-card').filter(
  c => c.title.startsWith('gradient norm:') || c.title.startsWith('grad/weight ratio:'));
const buttons = cards.flatMap(card => deepAll(card, 'paper-icon-button').filter(b => b.title === 'Toggle y-axis log scale'));
buttons.forEach(b => b.click());
return buttons.length;
"""
)

# The axis tick values of the per-layer gradient-norm chart once its y axis is logarithmic (ticks like 1e-14),
# else null.
_PER_LAYER_TICKS_IF_LOG = page_script(
    """
const card = deepAll(document, 'tf-custom-scalar-multi-line-chart-card').find(c => c.title === 'gradient norm: net: 0 … 12');
if (!card) return null;
const ticks = deepAll(card, '.y-axis text').map(t => t.textContent.trim()).filter(t => t && !isNaN(Number(t)));
return ticks.filter(t => /^1e-\\d+$/.test(t)).length >= 3 ? ticks.map(Number) : null;
"""
)


def test_custom_scalars_tab_renders_the_gradwatch_charts(page: tuple[str, Chromium], logdir: Path) -> None:
    written = [layout for layout in tensorboard_events.layouts(logdir / SICK) if CATEGORY in layout]
    assert written and set(written[0][CATEGORY]) == EXPECTED_CHARTS

    browser = _open(page, "custom_scalars")
    started = time.monotonic()
    shot = logdir / "tensorboard-custom-scalars.png"
    try:
        browser.wait_for(_CUSTOM_SCALAR_CARDS + "?.rendered", timeout=RENDER_TIMEOUT)
    except TimeoutError:
        state = browser.evaluate(_CUSTOM_SCALAR_CARDS) or {}
        browser.screenshot(shot)
        pytest.fail(
            f"the custom-scalars charts did not all render within {RENDER_TIMEOUT:.0f}s (screenshot: {shot}): "
            f"{state.get('categories')}"
        )
    render_s = time.monotonic() - started
    state: Any = browser.evaluate(_CUSTOM_SCALAR_CARDS)

    # The sick run's early layers have gradients around 1e-18: flat on 0 on a linear axis. Switch the per-layer
    # charts to a log axis (the card's own button, as a user would) and check the axis now reaches that far down,
    # i.e. every layer's line is really drawn where it belongs; the screenshot shows this view.
    clicked = browser.evaluate(_LOG_SCALE_PER_LAYER_CHARTS)
    assert clicked == len(ON_PAGE) - 1
    ticks = browser.wait_for(_PER_LAYER_TICKS_IF_LOG, timeout=RENDER_TIMEOUT)
    assert min(ticks) < 1e-12 and max(ticks) > 1e-3, ticks
    time.sleep(0.5)  # let the redraw settle before the picture
    png = browser.screenshot(shot)

    categories = {c["name"]: c for c in state["categories"]}
    assert CATEGORY in categories, f"no '{CATEGORY}' category; page shows: {list(categories)}"
    cards = {card["title"]: card for card in categories[CATEGORY]["cards"]}
    assert set(cards) == set(ON_PAGE)
    for title, card in cards.items():
        # every logged step drawn; at least one line per series (run x layer)
        assert card["points"] >= STEPS, (title, card)
        assert card["lines"] >= ON_PAGE[title], (title, card)
    assert CATEGORY in state["text"] and all(title in state["text"] for title in ON_PAGE)

    width, height = _png_size(png)
    assert (width, height) == (1280, 800)
    target = os.environ.get("GRADWATCH_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
    print(f"custom scalars rendered in {render_s:.1f}s; screenshot {shot} ({len(png)} bytes)")


def test_two_runs_in_one_folder_show_their_layouts_side_by_side(page: tuple[str, Chromium], logdir: Path) -> None:
    # TensorBoard shows one page for every run: the union of the runs' layouts, and each chart drawn from every
    # run's tags its regexes match (docs/tensorboard.md). Check that on the page: every chart of each run's own
    # layout once, nothing else, and in each per-layer chart exactly the (run, layer) series its regex names.
    import json
    import re

    from tests.browser import http_get

    base, _ = page
    own = {run: tensorboard_events.layouts(logdir / run)[0][CATEGORY] for run in (HEALTHY, SICK)}
    served = json.loads(http_get(f"{base}/data/plugin/custom_scalars/layout"))
    served_charts = [c for cat in served["category"] if cat["title"] == CATEGORY for c in cat["chart"]]
    assert sorted(c["title"] for c in served_charts) == sorted(set(own[HEALTHY]) | set(own[SICK]))

    browser = _open(page, "custom_scalars")
    state = browser.wait_for(_CUSTOM_SCALAR_CARDS + "?.rendered && " + _CUSTOM_SCALAR_CARDS, timeout=RENDER_TIMEOUT)
    cards = {c["title"]: c for cat in state["categories"] if cat["name"] == CATEGORY for c in cat["cards"]}
    assert set(cards) == set(own[HEALTHY]) | set(own[SICK])
    tags = {run: set(tensorboard_events.scalars(logdir / run)) for run in (HEALTHY, SICK)}
    for title, card in cards.items():
        regexes = [re.compile(r) for r in next(own[run][title] for run in own if title in own[run])]
        series = sum(any(r.search(t) for r in regexes) for run in tags for t in tags[run])
        if title.startswith(("gradient norm:", "grad/weight ratio:")):
            assert series == ON_PAGE[title], (title, series)
        # each series drawn once, or twice where TensorBoard draws the smoothed line over the raw one
        assert card["lines"] in (series, 2 * series), (title, card, series)


def test_text_tab_shows_the_alert(page: tuple[str, Chromium]) -> None:
    browser = _open(page, "text")
    text = browser.wait_for(
        page_script(
            """
const dashboard = deepAll(document, 'tf-text-dashboard')[0];
const text = dashboard ? deepText(dashboard) : '';
return text.includes('Vanishing gradients at step') ? text : null;
"""
        ),
        timeout=RENDER_TIMEOUT,
    )
    assert "gradwatch/alerts/vanishing_gradient" in text
    assert "layer 'net.0'" in text and "ReLU-family activations" in text
    assert SICK in text


def test_histograms_tab_shows_gradient_histograms(page: tuple[str, Chromium]) -> None:
    browser = _open(page, "histograms")
    titles = browser.wait_for(
        page_script(
            """
const dashboard = deepAll(document, 'tf-histogram-dashboard')[0];
if (!dashboard) return null;
const drawn = deepAll(dashboard, 'vz-histogram-timeseries').filter(h => deepAll(h, 'path').some(
  p => (p.getAttribute('d') || '').length > 20));
if (!drawn.length) return null;
return deepText(dashboard).split('\\n').filter(t => t.startsWith('gradwatch/grad_hist/'));
"""
        ),
        timeout=RENDER_TIMEOUT,
    )
    assert "gradwatch/grad_hist/net.0" in titles
    assert {t for t in titles if t.startswith("gradwatch/")} <= {f"gradwatch/grad_hist/net.{i}" for i in range(41)}


def test_images_tab_shows_the_gradient_flow_picture(page: tuple[str, Chromium]) -> None:
    browser = _open(page, "images")
    found = browser.wait_for(
        page_script(
            """
const dashboard = deepAll(document, 'tf-image-dashboard')[0];
if (!dashboard) return null;
const images = deepAll(dashboard, 'img').filter(i => i.complete && i.naturalWidth >= 400 && i.naturalHeight >= 200);
if (images.length < 2) return null;
return {count: images.length, text: deepText(dashboard)};
"""
        ),
        timeout=RENDER_TIMEOUT,
    )
    # one picture per run (the per-layer gradient RMS against depth), drawn, at its real size
    assert found["count"] >= 2 and "gradwatch/gradient_flow" in found["text"]


# -- a deep model under the default budget: is the page still readable? ------------------------------------------------
DEEP = "residual_mlp_48_blocks"


@pytest.fixture(scope="module")
def deep_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Chromium]]:
    """A 98-layer residual MLP (48 blocks) trained with ``GradWatch()`` at its defaults, served and opened."""
    from lightning_gradwatch import GradWatch
    from tests.models import DeepResidualMLP

    root = tmp_path_factory.mktemp("tensorboard_deep")
    torch.manual_seed(0)
    logger = pl.loggers.TensorBoardLogger(str(root), name="", version=DEEP)
    trainer = pl.Trainer(**trainer_kwargs(root, max_steps=STEPS, callbacks=[GradWatch()], logger=logger))
    trainer.fit(Classifier(DeepResidualMLP(), lr=0.01))
    with tensorboard_server(root) as base, Chromium(width=1280, height=1000) as browser:
        yield root / DEEP, base, browser


def _drawn_cards(expected: dict[str, int]) -> str:
    """A page script: the cards titled as ``expected`` once each draws at least its expected number of lines over
    every logged step, else null; the first card not drawn yet is scrolled into view (off-screen cards wait)."""
    import json

    return page_script(
        """
const expected = EXPECTED;
const cards = deepAll(document, 'tf-custom-scalar-multi-line-chart-card').filter(c => c.title in expected);
const state = cards.map(card => ({
  title: card.title,
  card,
  points: Math.max(0, ...deepAll(card, 'path.line').map(p => (p.getAttribute('d') || '').split('L').length)),
  lines: deepAll(card, 'path.line').filter(p => (p.getAttribute('d') || '').includes('L')).length,
}));
const waiting = state.filter(c => c.lines < expected[c.title] || c.points < MIN_POINTS);
if (state.length < Object.keys(expected).length) return null;
if (waiting.length) { waiting[0].card.scrollIntoView(); return null; }
window.scrollTo(0, 0);
return state.map(({title, points, lines}) => ({title, points, lines}));
""".replace("EXPECTED", json.dumps(expected)).replace("MIN_POINTS", str(STEPS))
    )


def test_a_deep_model_under_the_default_budget_renders_a_bounded_readable_page(
    deep_page: tuple[Path, str, Chromium],
) -> None:
    """98 layers: the gradient charts show one series per block (50 per metric), in a bounded number of charts of
    a few lines each, and the page renders in time; the screenshot is docs/tensorboard-deep-model.png."""
    import re

    logdir, base, browser = deep_page
    [layout] = [layout for layout in tensorboard_events.layouts(logdir) if CATEGORY in layout]
    tags = [t for t in tensorboard_events.scalars(logdir) if t.startswith("gradwatch/grad_norm/")]
    assert len(tags) == 50  # the input and output layers and 48 blocks: not 98 layers
    per_chart = {
        title: sum(any(re.search(r, t) for r in regexes) for t in tags)
        for title, regexes in layout[CATEGORY].items()
        if title.startswith("gradient norm:")
    }
    assert sum(per_chart.values()) == len(tags) and 3 <= len(per_chart) <= 10, per_chart  # each series charted once
    assert max(per_chart.values()) <= 16, per_chart  # no chart crowded
    assert len(layout[CATEGORY]) <= 40, sorted(layout[CATEGORY])  # the whole category: a page, not thousands

    browser.navigate(f"{base}/#custom_scalars")
    started = time.monotonic()
    drawn = browser.wait_for(_drawn_cards(per_chart), timeout=3 * RENDER_TIMEOUT)
    render_s = time.monotonic() - started
    # every series drawn over every logged step (TensorBoard may draw a smoothed line over each raw one)
    assert {c["title"] for c in drawn} == set(per_chart)
    assert all(c["lines"] in (per_chart[c["title"]], 2 * per_chart[c["title"]]) for c in drawn), drawn
    time.sleep(0.5)
    shot = logdir / "tensorboard-deep-model.png"
    png = browser.screenshot(shot)
    assert _png_size(png) == (1280, 1000)
    target = os.environ.get("GRADWATCH_SCREENSHOT_DEEP")
    if target:
        shutil.copyfile(shot, target)
    print(f"deep model: {len(tags)} series in {len(per_chart)} charts, drawn in {render_s:.1f}s; {shot}")
