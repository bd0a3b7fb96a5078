"""The README's two set-up lines, run as written in a fresh virtualenv from a clean clone of this repository.

It installs torch and every dependency (about 2 minutes from pip's cache and the CPU torch wheel on disk), so it
runs only with ``GRADWATCH_README_SETUP=1``: ``.ci/run`` runs it as its own step after the main job. The clone is
of this repository's committed HEAD, the README's clone URL replaced by the local path (CI has no network to the
repository; the rest of the line is unchanged). The second line, the whole suite, is what CI's main job runs in
its own fresh virtualenv; here it runs on the packaging tests and the docs links, so that the line is known to work.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("GRADWATCH_README_SETUP") != "1", reason="set GRADWATCH_README_SETUP=1 (CI runs it on its own)"
)


def setup_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index("<!-- setup -->") :]
    match = re.search(r"^```bash\n(.*?)^```", after, flags=re.MULTILINE | re.DOTALL)
    assert match is not None
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_readme_setup_lines_take_a_fresh_machine_to_the_example_and_the_tests(tmp_path: Path) -> None:
    example, tests = setup_lines()
    assert tests == "pytest"
    clone = re.match(r"git clone (\S+) && cd (\S+) && ", example)
    assert clone is not None, example
    url, folder = clone.groups()
    assert url.rstrip("/").endswith(folder)
    assert shutil.which("git") is not None
    local = example.replace(f"git clone {url} ", f"git clone --quiet {ROOT} {folder} ", 1)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS")}
    venv_bin = os.path.dirname(shutil.which("python3") or "")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin and ".venv" not in p)
    env["PATH"] = os.pathsep.join([*([venv_bin] if venv_bin else []), env["PATH"]])  # a python3 to make the venv
    script = f"set -e\n{local}\n{tests} -q -p no:cacheprovider tests/test_packaging.py tests/test_docs.py -k 'not sick_example and not built_package'\n"
    started = time.monotonic()
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "gradwatch: healthy run - no gradient problems found in 423 steps." in output  # what the README says
    assert re.search(r"\d+ passed", run.stdout), run.stdout[-2000:]
    assert (tmp_path / folder / ".venv" / "bin" / "python").exists()
    print(f"README set-up lines took {took:.0f}s")
