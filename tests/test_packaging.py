"""Package metadata that PyPI and users rely on: one version, a license file matching the declared license,
classifiers and URLs, and floors that .ci/constraints-floors.txt pins exactly (the second CI job installs that
file, so a floor raised in one place and not the other cannot slip through).

Building the sdist and wheel and ``twine check`` run in .ci/run (they need the network for the build backend).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import lightning_gradwatch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).parent.parent
HOME = "https://github.com/lightning-gradwatch/lightning-gradwatch"
# Declared floors the floor job cannot install, and why (docs/dependencies.md).
NOT_PINNED = {"torch": "no CPU wheel of the floor can be installed without a multi-GB CUDA download"}
# Pinned though not declared: what the floors need around them (reasons in the constraints file).
ENVIRONMENT = {"setuptools"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in [*project["dependencies"], *extras.get("dev", [])]]


def floor_of(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: one '>=' floor expected"
    return floors[0]


def pinned_floors() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "constraints-floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints-floors.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_version_is_single_sourced_from_the_package() -> None:
    project = pyproject()["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_gradwatch.__version__"}
    assert str(Version(lightning_gradwatch.__version__)) == lightning_gradwatch.__version__  # PEP 440, normalised


def test_license_file_is_the_apache_2_license_declared() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    sections = re.findall(r"^\s+(\d)\. (\w[\w ]*)\.", text, flags=re.MULTILINE)
    assert [n for n, _ in sections] == [str(i) for i in range(1, 10)]  # the nine sections, none cut
    assert "END OF TERMS AND CONDITIONS" in text
    # a license expression forbids License :: classifiers (PEP 639); PyPI rejects the upload otherwise
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_python_classifiers_agree_with_requires_python() -> None:
    project = pyproject()["project"]
    requires = SpecifierSet(project["requires-python"])
    prefix = "Programming Language :: Python :: 3."
    minors = sorted(int(c.removeprefix(prefix)) for c in project["classifiers"] if c.startswith(prefix))
    assert minors, "no Python version classifiers"
    assert minors == list(range(minors[0], minors[-1] + 1))  # no gap
    assert all(f"3.{m}" in requires for m in minors)
    assert f"3.{minors[0] - 1}" not in requires  # the oldest classifier is the oldest Python allowed
    assert any(c.startswith("Topic ::") for c in project["classifiers"])


def test_project_urls_point_at_the_repository() -> None:
    urls = pyproject()["project"]["urls"]
    assert urls["Homepage"] == HOME
    assert {"Homepage", "Issues", "Changelog"} <= set(urls)
    assert all(url.startswith(HOME) for url in urls.values())


def test_floor_constraints_pin_exactly_the_declared_floors() -> None:
    pins = pinned_floors()
    declared = {canonicalize_name(r.name): floor_of(r) for r in declared_requirements()}
    for name, floor in declared.items():
        if name in NOT_PINNED:
            assert name not in pins
        else:
            assert pins.get(name) == floor, f"{name}: pyproject says >={floor}, constraints pin {pins.get(name)}"
    extra = set(pins) - set(declared) - ENVIRONMENT
    assert not extra, f"pinned but not declared: {sorted(extra)}"


def test_runtime_dependencies_are_the_third_party_imports() -> None:
    # what the package imports must be declared (typing_extensions was not), and what is declared must be used
    # (torchmetrics was not: docs/dependencies.md says why the activation tallies do not use it)
    imported: set[str] = set()
    optional: set[str] = set()  # imported under `try: ... except ImportError`: used when present, not required
    for path in (ROOT / "lightning_gradwatch").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                optional |= {m for child in node.body for m in _imports(child)}
    third_party = {
        canonicalize_name(m) for m in imported - optional - set(sys.stdlib_module_names) - {"lightning_gradwatch"}
    }
    runtime = {canonicalize_name(Requirement(r).name) for r in pyproject()["project"]["dependencies"]}
    # tensorboard is not imported: the callbacks write through Lightning's TensorBoardLogger, whose
    # torch.utils.tensorboard SummaryWriter (scalars, histograms, the custom-scalars layout) needs it
    assert runtime - {"tensorboard"} == third_party


def _imports(node: ast.AST) -> set[str]:
    found: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            found |= {alias.name.split(".")[0] for alias in child.names}
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            found.add(child.module.split(".")[0])
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)
