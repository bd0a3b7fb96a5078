"""Regenerate docs/tensorboard-custom-scalars.png, the README's TensorBoard screenshot, and
docs/tensorboard-deep-model.png (a 48-block model under the default chart budget, docs/gradient_norm_logger.md).

Runs tests/test_tensorboard_browser.py (real runs, a real TensorBoard, headless Chromium) with
``GRADWATCH_SCREENSHOT`` and ``GRADWATCH_SCREENSHOT_DEEP`` set, so each picture is exactly what its test checked.
Needs Debian's ``chromium`` (``.ci/install-chromium``).

    python docs/make_screenshot.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "tensorboard-custom-scalars.png"
DEEP = REPO / "docs" / "tensorboard-deep-model.png"

if __name__ == "__main__":
    before = {t: t.stat().st_mtime_ns if t.exists() else None for t in (TARGET, DEEP)}
    env = {
        **os.environ,
        "GRADWATCH_SCREENSHOT": str(TARGET),
        "GRADWATCH_SCREENSHOT_DEEP": str(DEEP),
        "OMP_NUM_THREADS": "1",
    }
    tests = [
        "tests/test_tensorboard_browser.py::test_custom_scalars_tab_renders_the_gradwatch_charts",
        "tests/test_tensorboard_browser.py::test_a_deep_model_under_the_default_budget_renders_a_bounded_readable_page",
    ]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *tests], cwd=REPO, env=env, check=False)
    for target in (TARGET, DEEP):
        if result.returncode != 0 or not target.exists() or target.stat().st_mtime_ns == before[target]:
            sys.exit(result.returncode or "the tests did not write the screenshots (skipped? is chromium installed?)")
        print(f"wrote {target.relative_to(REPO)} ({target.stat().st_size // 1024} KiB)")
