"""A buffer is judged by what a step did to it: a constant ``-inf`` causal mask is data, a NaN or a new Inf a fault.

Real fits of a small causal language model whose mask is a registered ``-inf`` buffer, the usual way in
hand-written GPTs; before the fix ``GradWatch()`` stopped every such run at step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradWatch, NaNGuard
from lightning_gradwatch.guards._buffer_baseline import judged_buffers
from tests.models import trainer_kwargs

T, VOCAB, D = 12, 40, 32


class MaskedLM(pl.LightningModule):
    """Embedding, one causal self-attention block, a head; the mask a ``-inf`` buffer."""

    def __init__(self, mask: str = "generate") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        if mask == "generate":
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))
        else:
            self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (512, 1), generator=g)
        self.tokens = (start + torch.arange(T)) % VOCAB  # a learnable sequence: each token the previous + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        a, _ = self.attn(h, h, h, attn_mask=self.mask[: x.shape[1], : x.shape[1]], need_weights=False)
        return self.head(self.norm(h + a))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        logits = self(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.tokens), batch_size=32, shuffle=True)


class WriteInto(Callback):
    """At the start of step ``step`` write ``value`` at ``index`` of the mask."""

    def __init__(self, step: int, index: tuple[int, int], value: float) -> None:
        self.step, self.index, self.value = step, index, value

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            pl_module.mask[self.index] = self.value


def fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], steps: int = 30) -> pl.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, callbacks=[*callbacks, checkpoints], enable_checkpointing=True, max_steps=steps)
    )
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize("mask", ["generate", "triu"])
def test_a_constant_minus_inf_mask_buffer_is_data_not_a_fault(tmp_path: Path, mask: str) -> None:
    preset = GradWatch()
    trainer = fit(tmp_path, MaskedLM(mask), [preset])
    assert trainer.global_step == 30
    assert not [a for a in preset.alerts if a.kind == "non_finite"]
    assert not [a for a in preset.alerts if a.severity == "warning"], [a.message for a in preset.alerts]


def test_a_nan_written_into_the_mask_is_a_fault_and_a_halt_checkpoint_keeps_the_mask(tmp_path: Path) -> None:
    guard = NaNGuard()
    model = MaskedLM()
    trainer = fit(tmp_path, model, [WriteInto(7, (0, 5), float("nan")), guard])
    [alert] = guard.alerts
    assert alert.kind == "non_finite" and alert.step == 7 and "mask" in alert.message
    assert trainer.global_step == 8 and guard.halt_step == 7
    # the copy kept after step 6's clean check repaired it; the mask's -inf is not a poisoned state
    assert guard.halt_checkpoint is not None
    saved = torch.load(guard.halt_checkpoint, weights_only=False)["state_dict"]["mask"]
    assert not torch.isnan(saved).any() and torch.equal(saved, nn.Transformer.generate_square_subsequent_mask(T))


def test_an_inf_in_a_finite_position_of_the_mask_is_a_fault(tmp_path: Path) -> None:
    guard = NaNGuard(action="skip")
    model = MaskedLM()
    trainer = fit(tmp_path, model, [WriteInto(5, (3, 1), float("-inf")), guard])
    [alert] = guard.alerts
    assert alert.step == 5 and "mask" in alert.message
    assert trainer.global_step == 30 and guard.fault_steps == 1  # the buffers' copy repaired it; the run goes on
    assert torch.isfinite(model.mask[3, 1])


def test_a_run_halted_for_a_nan_batch_saves_its_checkpoint_despite_the_mask(tmp_path: Path) -> None:
    class NaNBatch(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            pl_module.poison = trainer.global_step == 6

    class Poisoned(MaskedLM):
        poison = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out * float("nan") if self.poison else out

    guard = NaNGuard()
    model = Poisoned()
    fit(tmp_path, model, [NaNBatch(), guard])
    assert guard.halt_step == 6 and guard.halt_checkpoint is not None
    state = torch.load(guard.halt_checkpoint, weights_only=False)["state_dict"]
    assert torch.isinf(state["mask"]).sum() == T * (T - 1) // 2  # the mask, saved as it is


def test_judged_buffers_hide_only_the_original_infinite_positions() -> None:
    module = nn.Module()
    module.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), 1))
    module.register_buffer("stats", torch.ones(3))
    assert all(torch.isfinite(b).all() for _, b in judged_buffers(module))
    module.mask[2, 0] = float("inf")  # a finite position went infinite
    module.mask[0, 2] = float("nan")  # a masked position went NaN
    judged = dict(judged_buffers(module))
    assert torch.isinf(judged["mask"][2, 0]) and torch.isnan(judged["mask"][0, 2])
    assert int((~torch.isfinite(judged["mask"])).sum()) == 2
