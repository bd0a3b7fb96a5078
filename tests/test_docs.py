"""What a newcomer reads: every link of README.md and docs/ opens a file of the repository, the package index gets
the same text with links that work there, and the README's "see it find a problem" command prints what the README
shows."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def _setup_module() -> Any:
    spec = importlib.util.spec_from_file_location("gradwatch_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__, i.e. in a build
    return module


SETUP = _setup_module()


def links(text: str) -> list[str]:
    """The targets of the Markdown links and pictures of ``text``, code blocks left out."""
    return [m.group(3) for m in SETUP.LINK.finditer(FENCE.sub("", text))]


def test_link_pattern_finds_links_and_pictures() -> None:
    text = '[a](docs/a.md) ![p](b.png) [`c`](../c.md#x) `[no](code)`?\n```\n[no](fenced.md)\n```\n[t](d.md "title")'
    assert links(text) == ["docs/a.md", "b.png", "../c.md#x", "[no](code)"[5:-1], "d.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_link_opens_a_file_of_the_repository(document: Path) -> None:
    home = SETUP.source_url(ROOT)
    broken, absolute = [], []
    for target in links(document.read_text(encoding="utf-8")):
        if target.startswith(home):
            absolute.append(target)  # opens only online, and only once the repository is published there
        elif SETUP.is_relative(target):
            path = (document.parent / target.partition("#")[0]).resolve()
            if not path.is_file() or ROOT.resolve() not in path.parents:
                broken.append(target)
    assert not broken, f"{document.name}: links to no file of the repository: {broken}"
    assert not absolute, f"{document.name}: link the repository's own files relatively: {absolute}"


def test_long_description_links_open_on_the_package_index() -> None:
    home = SETUP.source_url(ROOT)
    text = SETUP.long_description(ROOT)
    targets = links(text)
    assert len(targets) >= 15 and not [t for t in targets if SETUP.is_relative(t)]
    raw = home.replace("https://github.com/", "https://raw.githubusercontent.com/")
    for target in targets:
        if target.startswith(f"{home}/blob/main/"):
            path = target.removeprefix(f"{home}/blob/main/").partition("#")[0]
        elif target.startswith(f"{raw}/main/"):
            path = target.removeprefix(f"{raw}/main/")
        else:
            assert target.startswith("https://") and "lightning-gradwatch" not in target, target
            continue
        assert (ROOT / path).is_file(), target
    # the README's own text, links aside
    assert SETUP.LINK.sub("", text) == SETUP.LINK.sub("", (ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_built_package_carries_the_rewritten_description(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("lightning_gradwatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    assert "Description-Content-Type: text/markdown" in text
    description = text.split("\n\n", 1)[1]
    assert description.strip() == SETUP.long_description(ROOT).strip()


# -- the README's second example -----------------------------------------------------------------------------------


def _block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- {marker} -->") :]
    match = re.search(r"^```[a-z]*\n(.*?)^```", after, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, f"no code block after <!-- {marker} -->"
    return match.group(1)


def _normalise(line: str) -> str:
    """Numbers that depend on the machine (floats, timings, rates, the run's version) as placeholders."""
    line = re.sub(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+it/s, v_num=\d+\]", "[time, rate]", line)
    line = re.sub(r"version_\d+", "version_N", line)
    return re.sub(r"\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+", "N", line).rstrip()


def test_readme_sick_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    command = _block_after("sick-example").strip()
    assert command.startswith("python examples/train_mlp.py fit ") and "\n" not in command
    shown = [_normalise(line) for line in _block_after("sick-output").splitlines() if line.strip()]

    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the command as written, its runs/ in tmp_path
    args = command.split()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}  # the order a terminal shows
    env.pop("OMP_NUM_THREADS", None)  # as a newcomer runs it: the example chooses its threads
    run = subprocess.run(
        [sys.executable, *args[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    printed = [_normalise(line) for line in re.split(r"[\r\n]", run.stdout) if line.strip()]
    console = printed

    position = 0
    for line in shown:  # every line the README shows, in that order
        assert line in printed[position:], f"README shows {line!r}; the run printed:\n" + "\n".join(printed[-40:])
        position = printed.index(line, position) + 1
    # the alert comes above the progress bar as it runs (tqdm.write), not after it
    alert = next(i for i, line in enumerate(console) if line.startswith("[gradwatch vanishing_gradient]"))
    assert any(line.startswith("Epoch 0:") for line in console[:alert])
    assert any(line.startswith("Epoch 0:") for line in console[alert + 1 :])
    report_dir = next(tmp_path.glob("runs/train_mlp_preset/version_*"))
    assert {"gradwatch_report.md", "gradwatch_report.json"} <= {p.name for p in report_dir.iterdir()}
    shutil.rmtree(tmp_path / "runs")


def test_every_alert_kind_and_cause_is_documented_in_alerts_md() -> None:
    """docs/alerts.md is the contract users read: a kind or cause added to the registry and not to the page fails
    here (and one the page lists that no longer exists)."""
    import re

    from lightning_gradwatch.alerts import ALERT_CAUSES, ALERT_KINDS

    page = (Path(__file__).resolve().parent.parent / "docs" / "alerts.md").read_text()
    kinds_table = page.split("## Kinds", 1)[1].split("Causes (", 1)[0]
    documented = {
        k
        for row in kinds_table.splitlines()
        if row.startswith("| `")
        for k in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert documented == set(ALERT_KINDS), (set(ALERT_KINDS) - documented, documented - set(ALERT_KINDS))
    causes = page.split("Causes (", 1)[1].split("See [", 1)[0]
    missing = [cause for cause in ALERT_CAUSES if f"`{cause}`" not in causes]
    assert not missing, missing


def test_the_example_callback_of_development_md_runs_in_a_fit(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from tests.models import Classifier, mlp, trainer_kwargs

    text = (ROOT / "docs" / "development.md").read_text()
    code = text.split("<!-- example-callback -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "example_callback"}
    exec(compile(code, "docs/development.md", "exec"), namespace)
    callback = namespace["DominantLayer"](threshold=0.2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_steps=5))
    trainer.fit(Classifier(mlp()))
    assert [(a.kind, a.step) for a in callback.alerts] == [("dominant_layer", 0)]
    assert callback.alerts[0].name.startswith("net.")
