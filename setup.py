"""The package's long description: README.md with its links made absolute, so that they open on the package index.

The README links files of the repository relatively (``docs/nan_guard.md``), which works in a clone, in the
source distribution and on the repository's web page, but not on the package index, which shows the text alone.
At build time each relative link becomes ``<Source URL>/blob/main/<path>`` (pictures: ``raw.githubusercontent``),
the Source URL being the one in ``pyproject.toml``. ``tests/test_docs.py`` checks the result.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BRANCH = "main"
# [text](target) and ![alt](target), the target without spaces; an optional "title" after it is kept
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)([^)]*)\)")


def source_url(root: Path = ROOT) -> str:
    """The Source URL of ``pyproject.toml`` (read without a TOML parser: Python 3.10 has none)."""
    match = re.search(r'^Source\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError("pyproject.toml: no Source URL under [project.urls]")
    return match.group(1).rstrip("/")


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "/"))


def absolute_links(text: str, base: str, document: str = "README.md") -> str:
    """``text`` (a Markdown file at ``document`` in the repository) with every relative link made absolute."""
    raw = base.replace("https://github.com/", "https://raw.githubusercontent.com/", 1)
    folder = posixpath.dirname(document)

    def rewrite(match: re.Match[str]) -> str:
        bang, label, target, rest = match.groups()
        if not is_relative(target):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        path = posixpath.normpath(posixpath.join(folder, path))
        url = f"{raw}/{BRANCH}/{path}" if bang else f"{base}/blob/{BRANCH}/{path}{hash_}{anchor}"
        return f"{bang}[{label}]({url}{rest})"

    return LINK.sub(rewrite, text)


def long_description(root: Path = ROOT) -> str:
    return absolute_links((root / "README.md").read_text(encoding="utf-8"), source_url(root))


if __name__ == "__main__":
    from setuptools import setup

    setup(long_description=long_description(), long_description_content_type="text/markdown")
