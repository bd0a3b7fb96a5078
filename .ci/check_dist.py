"""Check what `python -m build` made, beyond `twine check`: usage `python .ci/check_dist.py DIST_DIR`.

- the sdist carries every tracked file of the package, the tests (every helper and script they import or run),
  and the examples, benchmarks and docs the tests load, so its tests run from the unpacked sdist;
- the wheel carries the package and the LICENSE, and nothing else at its top level;
- both say the version `lightning_gradwatch.__version__` says, and the declared license.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).parent.parent
SDIST_TREES = ["lightning_gradwatch", "tests", "examples", "benchmarks", "docs"]
SDIST_FILES = ["LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in", "setup.py"]


def package_version() -> str:
    text = (ROOT / "lightning_gradwatch" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, flags=re.MULTILINE)
    assert match, "lightning_gradwatch/__init__.py has no literal __version__"
    return match.group(1)


def check_metadata(raw: str, where: str, version: str) -> None:
    meta = Parser().parsestr(raw)
    assert meta["Version"] == version, f"{where}: version {meta['Version']}, the package says {version}"
    assert meta["License-Expression"] == "Apache-2.0", f"{where}: License-Expression {meta['License-Expression']}"
    assert "LICENSE" in meta.get_all("License-File", []), f"{where}: no License-File: LICENSE"


def main(dist: Path) -> None:
    version = package_version()
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")

    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in names if "/" in n}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        check_metadata(pkg_info.read().decode(), sdist.name, version)
    tracked = subprocess.run(
        ["git", "ls-files", "--", *SDIST_TREES, *SDIST_FILES], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    missing = sorted(set(tracked) - members)
    assert not missing, f"{sdist.name} lacks tracked files: {missing}"
    stray = sorted(m for m in members if "__pycache__" in m or m.endswith((".pyc", ".pyo")))
    assert not stray, f"{sdist.name} carries build leftovers: {stray}"

    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = f"lightning_gradwatch-{version}.dist-info"
        tops = {n.split("/")[0] for n in names}
        assert tops == {"lightning_gradwatch", info}, f"{wheel.name}: unexpected top level {sorted(tops)}"
        assert f"{info}/licenses/LICENSE" in names, f"{wheel.name}: no LICENSE"
        assert "lightning_gradwatch/py.typed" in names, f"{wheel.name}: no py.typed"
        check_metadata(whl.read(f"{info}/METADATA").decode(), wheel.name, version)

    print(f"{sdist.name}: {len(members)} entries, every tracked file of {SDIST_TREES} present")
    print(f"{wheel.name}: the package, py.typed and LICENSE; version {version}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
