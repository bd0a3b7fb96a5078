"""The guards' integrity matrix: for each fault, action and training setup, are the states a guard saves or restores
finite, and does an update computed at a faulty step stay in the weights?

Setups (the same small net: a frozen ``fixed`` Linear no optimizer holds, a ``body`` of Linear, BatchNorm1d and
ReLU, a ``head``; 256 samples, batch 32, 4 epochs, the fault at batch 12):

- ``one``: one Adam over every trainable weight;
- ``two``: manual optimization, a GAN-like pair of Adams (the head's, then the body's), the fault in the second;
- ``added``: the body frozen, then unfrozen into the optimizer by ``BaseFinetuning`` at epoch 1 (batch 8).

Faults, all aimed at the body: a NaN batch, a NaN written into a body weight, into the frozen weight, into the
BatchNorm running mean and into the body weight's Adam moment (NaNGuard's faults, under halt, skip and rollback);
a loss spike (the loss x1e3 at one batch) and a level shift (+3 from batch 12 on: the gradients do not change)
under LossSpikeGuard's log, skip and rollback, NaNGuard beside at its defaults.

Measured: every state a guard calls good (the halt checkpoint, the state after each step it skipped or rolled
back) is scanned for NaN/Inf in weights, buffers and optimizer state. "Faulty updates kept": for a NaN fault, the
batches after which training went on (no halt) from a state with a NaN/Inf anywhere in it (a NaN update landed,
or the poisoned tensor was left as it was); for the spike, whether the spike batch's update stayed (the faulty
optimizer's parameters after it differ from those before it and from every earlier batch's: a rollback returns to
one of those). For the level shift: the updates dropped after it.

    python benchmarks/guard_integrity.py            # the whole matrix, a table for benchmarks/RESULTS.md
    python benchmarks/guard_integrity.py --setups two --faults nan_batch --actions halt
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import LossSpikeGuard, NaNGuard

SETUPS = ("one", "two", "added")
NAN_FAULTS = ("nan_batch", "nan_weight", "nan_frozen_weight", "nan_buffer", "nan_moment")
LOSS_FAULTS = ("loss_spike", "level_shift")
ACTIONS = {"nan": ("halt", "skip", "rollback"), "loss": ("log", "skip", "rollback")}


class Net(pl.LightningModule):
    def __init__(self, setup: str, fault: str, fault_batch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fixed = nn.Linear(16, 16).requires_grad_(False)  # used in forward, held by no optimizer
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.setup_name, self.fault, self.fault_batch = setup, fault, fault_batch
        self.automatic_optimization = setup != "two"
        self.batch_no = -1  # set by Probe: in manual optimization global_step counts both optimizers' steps
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 16, generator=g)
        self.data = TensorDataset(x, (x @ torch.randn(16, 4, generator=g)).argmax(1))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        at_fault = self.batch_no == self.fault_batch
        if at_fault and self.fault == "nan_batch":
            x = x * float("nan")
        loss = F.cross_entropy(self.head(self.body(self.fixed(x))), y)
        if at_fault and self.fault == "loss_spike":
            loss = loss * 1e3
        if self.fault == "level_shift" and self.batch_no >= self.fault_batch:
            loss = loss + 3.0
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self.loss(batch)
        opt_head, opt_body = self.optimizers()  # type: ignore[misc]
        x, y = batch
        clean = F.cross_entropy(self.head(self.body(self.fixed(x))), y)  # the first optimizer's loss: never faulty
        opt_head.zero_grad()
        self.manual_backward(clean)
        opt_head.step()
        loss = self.loss(batch)
        opt_body.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        return None

    def configure_optimizers(self) -> Any:
        if self.setup_name == "two":
            return [
                torch.optim.Adam(self.head.parameters(), lr=1e-3),
                torch.optim.Adam(self.body.parameters(), lr=1e-3),
            ]
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


class Unfreeze(BaseFinetuning):
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.body, train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.body, optimizer, train_bn=True)


def faulty_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    return trainer.optimizers[-1]  # the body's: the only one (one, added) or the second (two)


def state_tensors(module: nn.Module, trainer: pl.Trainer) -> list[torch.Tensor]:
    found = [p.detach() for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]
    moments = [v for o in trainer.optimizers for s in o.state.values() for v in s.values()]
    return found + [v for v in moments if isinstance(v, torch.Tensor)]


def finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit-for-bit equal, a NaN equal to a NaN (an untouched poisoned weight has not moved)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return False
    return all(bool(((x == y) | (x.isnan() & y.isnan())).all()) for x, y in zip(a, b, strict=True))


class Probe(Callback):
    """Numbers the batches, injects the state faults, and after each batch checks what the guards left."""

    def __init__(self, guards: list[Callback], fault: str, fault_batch: int) -> None:
        self.guards, self.fault, self.fault_batch = guards, fault, fault_batch
        self.checked: list[bool] = []  # one per state a guard called good (after it skipped or rolled back)
        self.kept = 0  # NaN faults: batches training went on from with a non-finite state; a spike: its update stayed
        self.dropped_after_fault = 0  # batches from the fault on whose update did not happen
        self.history: list[list[torch.Tensor]] = []  # the faulty optimizer's parameters at each batch start
        self._start: list[torch.Tensor] | None = None
        self._acted = self._counters()

    def _counters(self) -> tuple[int, ...]:
        out: list[int] = []
        for g in self.guards:
            if isinstance(g, NaNGuard):
                out += [g.fault_steps, g.rollbacks]
            elif isinstance(g, LossSpikeGuard):
                out += [len(g.spikes), g.skipped_batches]
        return tuple(out)

    def _halted(self) -> bool:
        return any(isinstance(g, NaNGuard) and g.halt_step is not None for g in self.guards)

    @staticmethod
    def _params(trainer: pl.Trainer) -> list[torch.Tensor]:
        return [p.detach().clone() for group in faulty_optimizer(trainer).param_groups for p in group["params"]]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        pl_module.batch_no += 1
        if pl_module.batch_no == self.fault_batch:
            target = {
                "nan_weight": lambda: pl_module.body[0].weight,
                "nan_frozen_weight": lambda: pl_module.fixed.weight,
                "nan_buffer": lambda: pl_module.body[1].running_mean,
                "nan_moment": lambda: faulty_optimizer(trainer).state[pl_module.body[0].weight]["exp_avg"],
            }.get(self.fault)
            if target is not None:
                with torch.no_grad():
                    target().view(-1)[0] = float("nan")
        self._start = self._params(trainer)
        self.history.append(self._start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._after_batch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._after_batch(trainer, pl_module)  # a halt may end the batch before on_train_batch_end

    def _after_batch(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._start is None:
            return
        before = self._start
        self._start = None
        after = self._params(trainer)
        moved = not same(after, before)
        returned = any(same(after, earlier) for earlier in self.history[:-1])
        if self.fault in LOSS_FAULTS:  # finite faults: the spike's update stays unless skipped or rolled back
            if self.fault == "loss_spike" and pl_module.batch_no == self.fault_batch and moved and not returned:
                self.kept += 1
        elif not self._halted() and not finite(state_tensors(pl_module, trainer)):
            self.kept += 1  # a NaN fault's update (or the poisoned state itself) is what training goes on from
        if pl_module.batch_no >= self.fault_batch and not moved:
            self.dropped_after_fault += 1
        acted = self._counters()
        if acted != self._acted and not self._halted():  # it skipped or rolled back and training goes on
            self.checked.append(finite(state_tensors(pl_module, trainer)))
        self._acted = acted


def checkpoint_is_finite(path: str) -> bool:
    saved = torch.load(path, weights_only=False)
    tensors = list(saved["state_dict"].values())
    tensors += [v for o in saved["optimizer_states"] for s in o["state"].values() for v in s.values()]
    return finite([t for t in tensors if isinstance(t, torch.Tensor)])


def run(setup: str, fault: str, action: str, fault_batch: int, root: Path, check_every: int) -> dict[str, Any]:
    if fault not in LOSS_FAULTS:
        nan_guard = NaNGuard(action=action, snapshot_every_n_steps=5, check_params_every_n_steps=check_every)  # type: ignore[arg-type]
        guards: list[Callback] = [nan_guard]
    else:
        nan_guard = NaNGuard()
        spike_guard = LossSpikeGuard(
            action=action,  # type: ignore[arg-type]
            warmup_steps=8,
            window=32,
            level_shift_after=5,
            snapshot_every_n_steps=5,
        )
        guards = [nan_guard, spike_guard]
    probe = Probe(guards, fault, fault_batch)
    extra: list[Callback] = [Unfreeze()] if setup == "added" else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        callbacks=[*extra, probe, *guards, ModelCheckpoint(dirpath=root / "ckpts")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    model = Net(setup, fault, fault_batch)
    trainer.fit(model)
    good = list(probe.checked)
    if nan_guard.halt_checkpoint:
        good.append(checkpoint_is_finite(nan_guard.halt_checkpoint))
    idle = fault in LOSS_FAULTS and setup == "two"  # LossSpikeGuard: automatic optimization only
    return {
        "states": len(good),
        "finite": sum(good),
        "kept": "-" if fault == "level_shift" else str(probe.kept),
        "dropped": probe.dropped_after_fault,
        "batches": model.batch_no + 1,
        "halted": nan_guard.halt_step is not None,
        "checkpoint": nan_guard.halt_checkpoint is not None,
        "idle": idle,
    }


def outcome(r: dict[str, Any]) -> str:
    if r["halted"]:
        return "halted at batch {}{}".format(r["batches"] - 1, ", checkpoint written" if r["checkpoint"] else "")
    note = " (LossSpikeGuard idle: manual optimization)" if r["idle"] else ""
    return f"went on, {r['dropped']} update(s) dropped from the fault on{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--faults", default=",".join(NAN_FAULTS + LOSS_FAULTS))
    parser.add_argument("--actions", default=None, help="default: halt,skip,rollback (NaN faults), log,skip,rollback")
    parser.add_argument("--fault-batch", type=int, default=12)
    parser.add_argument("--check-params-every-n-steps", type=int, default=10, help="NaNGuard's, for the NaN faults")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, states, finite_states, kept = [], 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups.split(","):
            for fault in args.faults.split(","):
                family = "loss" if fault in LOSS_FAULTS else "nan"
                actions = args.actions.split(",") if args.actions else ACTIONS[family]
                guard = "LossSpikeGuard" if family == "loss" else "NaNGuard"
                for action in actions:
                    where = Path(tmp) / f"{setup}-{fault}-{action}"
                    r = run(setup, fault, action, args.fault_batch, where, args.check_params_every_n_steps)
                    states, finite_states = states + r["states"], finite_states + r["finite"]
                    kept += int(r["kept"]) if r["kept"] != "-" else 0
                    share = f"{r['finite']}/{r['states']}"
                    rows.append(f"| {setup} | {fault} | {guard} {action} | {share} | {r['kept']} | {outcome(r)} |")
    print("| setup | fault | guard, action | finite states saved or restored | faulty updates kept | outcome |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nIn all: {finite_states}/{states} saved or restored states finite; {kept} faulty update(s) kept.")


if __name__ == "__main__":
    main()
