"""NaNGuard's integrity matrix: for each fault and action, are the states it saves or restores finite, and how many
steps pass from the fault to its alert?

Faults (injected at step ``--fault-step`` of a small BatchNorm MLP trained with Adam): a NaN batch, an Inf loss, a NaN
written into a weight, into a BatchNorm running mean, and into an Adam moment. Actions: halt, skip, rollback. A
"state the guard calls good" is the halt checkpoint it writes, the state after each rollback, and the state it
trains on after a skipped fault; each is scanned for NaN/Inf (weights, buffers, optimizer state).

    python benchmarks/guard_integrity.py            # the whole matrix, a table for benchmarks/RESULTS.md
    python benchmarks/guard_integrity.py --faults nan_batch --actions halt
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import NaNGuard

FAULTS = ("nan_batch", "inf_loss", "nan_weight", "nan_buffer", "nan_moment")
ACTIONS = ("halt", "skip", "rollback")


class Net(pl.LightningModule):
    def __init__(self, fault: str, step: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        self.fault, self.fault_step = fault, step
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 16, generator=g)
        self.data = TensorDataset(x, (x @ torch.randn(16, 4, generator=g)).argmax(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        at_fault = self.global_step == self.fault_step
        if at_fault and self.fault == "nan_batch":
            x = x * float("nan")
        loss = F.cross_entropy(self.net(x), y)
        return loss * float("inf") if at_fault and self.fault == "inf_loss" else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = [p.detach() for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]
    return found + [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Probe(Callback):
    """Injects the weight/buffer/moment faults and checks the state after every step the guard acted on."""

    def __init__(self, guard: NaNGuard, fault: str, step: int) -> None:
        self.guard, self.fault, self.step = guard, fault, step
        self.checked: list[bool] = []
        self._seen = (0, 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        target = {
            "nan_weight": lambda: pl_module.net[0].weight,
            "nan_buffer": lambda: pl_module.net[1].running_mean,
            "nan_moment": lambda: trainer.optimizers[0].state[pl_module.net[0].weight]["exp_avg"],
        }.get(self.fault)
        if target is not None:
            with torch.no_grad():
                target().view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        acted = (self.guard.fault_steps, self.guard.rollbacks)
        if acted != self._seen and not self.guard.halt_step:  # it skipped or rolled back and training goes on
            self.checked.append(finite(state_tensors(pl_module, trainer.optimizers[0])))
        self._seen = acted


def run(fault: str, action: str, fault_step: int, steps: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    guard = NaNGuard(action=action, snapshot_every_n_steps=5, check_params_every_n_steps=10)  # type: ignore[arg-type]
    probe = Probe(guard, fault, fault_step)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[probe, guard, ModelCheckpoint(dirpath=root / "ckpts")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer.fit(Net(fault, fault_step))
    good = list(probe.checked)
    if guard.halt_checkpoint:
        saved = torch.load(guard.halt_checkpoint, weights_only=False)
        tensors = list(saved["state_dict"].values())
        tensors += [v for o in saved["optimizer_states"] for s in o["state"].values() for v in s.values()]
        good.append(finite([t for t in tensors if isinstance(t, torch.Tensor)]))
    first_alert = min((a.step for a in guard.alerts), default=None)
    return {
        "states": len(good),
        "finite": sum(good),
        "latency": None if first_alert is None else first_alert - fault_step,
        "halted": guard.halt_step is not None,
        "checkpoint": guard.halt_checkpoint is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--actions", default=",".join(ACTIONS))
    parser.add_argument("--fault-step", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fault in args.faults.split(","):
            for action in args.actions.split(","):
                r = run(fault, action, args.fault_step, args.steps, Path(tmp) / f"{fault}-{action}")
                share = f"{r['finite']}/{r['states']}" + (f" ({r['finite'] / r['states']:.0%})" if r["states"] else "")
                rows.append(
                    f"| {fault} | {action} | {share} | {'-' if r['latency'] is None else r['latency']} | "
                    f"{'halted' if r['halted'] else 'went on'}{', checkpoint written' if r['checkpoint'] else ''} |"
                )
    print("| fault | action | finite states saved or restored | steps from fault to alert | outcome |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
