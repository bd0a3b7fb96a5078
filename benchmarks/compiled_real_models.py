"""GradWatch() on the real-model cases with their network compiled: silent as uncompiled, watched, no recompilation.

Each case of ``tests/real_models`` is fitted with ``task.net = torch.compile(task.net, backend=...)`` and
``GradWatch(forward_fn=lambda module, batch: module.net(batch[0]))`` (the tasks' training_step calls ``self.net``:
there is no ``forward`` for the default). Prints, per case: the wall time, the steps reached, dynamo's graph count
after step 2 and at the end (equal: nothing recompiled), the activation metrics logged from the eager passes, and
the alerts (warnings, then infos).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/compiled_real_models.py [--cases NAME ...] [--backend eager]``
(needs the ``real`` extra); the findings are in benchmarks/RESULTS_calibration.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from tests.real_models.shim import ensure_torchvision_loads

ensure_torchvision_loads()  # before anything imports torchvision (lightning does)

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from lightning_gradwatch import GradWatch  # noqa: E402
from tests.real_models.models import CASES_BY_NAME, Case, fit  # noqa: E402

#: The cases a compiled network is tried on: every RealTask case (the GAN steps two optimizers by hand).
DEFAULT_CASES = [name for name in CASES_BY_NAME if name not in ("gan", "gpt2_fp16")]


class GraphCount(Callback):
    """dynamo's count of compiled graphs at the end of each step."""

    def __init__(self) -> None:
        self.at: dict[int, int] = {}

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.at[trainer.global_step] = int(counters["stats"]["unique_graphs"])


def run(name: str, backend: str, root: str) -> str:
    case = CASES_BY_NAME[name]

    def compiled() -> Any:
        task = case.build()
        task.net = torch.compile(task.net, backend=backend)
        return task

    torch._dynamo.reset()
    counters.clear()
    watch, graphs = GradWatch(forward_fn=lambda module, batch: module.net(batch[0])), GraphCount()
    started = time.perf_counter()
    result = fit(Case(name, compiled, case.requires, case.max_steps, case.trainer, case.watched), root, [watch, graphs])
    metrics = sorted({k.split("/")[1] for k in result.logger.history if k.startswith(("gradwatch/dead_fraction",
                                                                                       "gradwatch/saturation"))})  # fmt: skip
    warnings = [f"{a.kind} {a.name} @{a.step}" for a in watch.alerts if a.severity == "warning"]
    infos = [f"{a.kind} {a.name}" for a in watch.alerts if a.severity == "info"]
    last = max(graphs.at)
    return (
        f"| {name} | {time.perf_counter() - started:.0f} | {result.task.trainer.global_step} | "
        f"{graphs.at.get(2)} / {graphs.at[last]} | {', '.join(metrics) or '-'} | {'; '.join(warnings) or 'none'} | "
        f"{len(infos)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="case names (default: all RealTask cases)")
    parser.add_argument("--backend", default="eager", help="torch.compile backend (inductor: minutes per case)")
    args = parser.parse_args()
    print("| case | seconds | steps | graphs at step 2 / at the end | activation metrics | warnings | infos |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        with tempfile.TemporaryDirectory() as root:
            print(run(name, args.backend, root), flush=True)


if __name__ == "__main__":
    main()
