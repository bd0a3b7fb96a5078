"""Regenerate docs/tensorboard-custom-scalars.png, the README's TensorBoard screenshot.

Runs tests/test_tensorboard_browser.py (real runs, a real TensorBoard, headless Chromium) with
``GRADWATCH_SCREENSHOT`` set, so the picture is exactly what the test checked. Needs Debian's ``chromium``
(``.ci/install-chromium``).

    python docs/make_screenshot.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "tensorboard-custom-scalars.png"

if __name__ == "__main__":
    before = TARGET.stat().st_mtime_ns if TARGET.exists() else None
    env = {**os.environ, "GRADWATCH_SCREENSHOT": str(TARGET), "OMP_NUM_THREADS": "1"}
    test = "tests/test_tensorboard_browser.py::test_custom_scalars_tab_renders_the_gradwatch_charts"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", test], cwd=REPO, env=env, check=False)
    if result.returncode != 0 or not TARGET.exists() or TARGET.stat().st_mtime_ns == before:
        sys.exit(result.returncode or "the test did not write the screenshot (skipped? is chromium installed?)")
    print(f"wrote {TARGET.relative_to(REPO)} ({TARGET.stat().st_size // 1024} KiB)")
