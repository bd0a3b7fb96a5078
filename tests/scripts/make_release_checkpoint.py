"""Writes tests/fixtures/checkpoint_0_1_0.ckpt: a checkpoint saved by the 0.1.0 code, which later code must load.

Run once per release whose checkpoint format is to be kept (``python tests/scripts/make_release_checkpoint.py``);
tests/test_release_checkpoint.py resumes from it. The run is small and deterministic: an MLP with half of its first
layer's units dead from the start, so that the saved state holds alerts, histories and tallies.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightning_gradwatch import GradientGeometry, GradientNoiseScale, GradWatch, __version__  # noqa: E402
from tests.models import Classifier, mlp, trainer_kwargs  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / f"checkpoint_{__version__.replace('.', '_')}.ckpt"


def model() -> Classifier:
    torch.manual_seed(0)
    net = mlp(depth=2, width=16)
    with torch.no_grad():
        net[0].bias[:8] = -50.0  # half the first layer's units never fire
    return Classifier(net, optimizer="adam", lr=0.01)


def callbacks() -> list[pl.Callback]:
    return [GradWatch(), GradientNoiseScale(), GradientGeometry(every_n_steps=10)]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(**trainer_kwargs(tmp, max_steps=60, callbacks=callbacks()))
        trainer.fit(model())
        FIXTURE.parent.mkdir(exist_ok=True)
        trainer.save_checkpoint(str(FIXTURE))
    print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
