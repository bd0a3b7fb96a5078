"""GradientNoiseScale: the simple gradient noise scale B_simple = tr(Sigma) / |G|^2, nearly for free."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_gradwatch._compat import lightning_classes
from lightning_gradwatch._distributed import all_reduce_sum
from lightning_gradwatch._params import local_tensor
from lightning_gradwatch._precision import grad_scaler, scale_of
from lightning_gradwatch._reporting import host_values
from lightning_gradwatch._step import StepGradients
from lightning_gradwatch._types import Null, OpenUnitInterval, PositiveInt
from lightning_gradwatch._validation import check_choice, check_number
from lightning_gradwatch.core.callback import GradwatchCallback, HookOrder
from lightning_gradwatch.functional.noise_scale import (
    noise_scale_ema_update,
    noise_scale_readout,
    noise_scale_state,
    noise_scale_terms,
)
from lightning_gradwatch.functional.norms import global_norm
from lightning_gradwatch.gradients._ddp_norm_hook import LocalNormHookState, register_local_norm_hook

Source = Literal["auto", "ddp", "accumulation"]
_SUPPORTED = lightning_classes("strategies", "SingleDeviceStrategy") + lightning_classes("strategies", "DDPStrategy")
_DEEPSPEED = lightning_classes("strategies", "DeepSpeedStrategy")
_TAGS = {
    "noise_scale": "gradwatch/noise_scale",
    "grad_sq_norm": "gradwatch/noise_scale/grad_sq_norm",
    "trace_sigma": "gradwatch/noise_scale/trace_sigma",
    "batch_size": "gradwatch/noise_scale/batch_size",
}


class GradientNoiseScale(GradwatchCallback):
    r"""Log the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, app. A.1).

    ``B_simple`` estimates the critical batch size: training with a batch far below it spends steps on gradient
    noise (a larger batch, or a higher learning rate with it, would help); far above it, extra examples barely
    improve the gradient. Its two terms come from squared gradient norms at two batch sizes, which training
    already has at hand:

    - ``source="ddp"``: each rank's own gradient (``b_small`` = the per-rank batch) against the all-reduced one
      (``b_big`` = the global batch). A DDP communication hook reads each bucket's local norm before the
      all-reduce, which it then does exactly as DDP would.
    - ``source="accumulation"``: the first micro-batch's gradient (read in ``on_after_backward``) against the
      accumulated one. Under DDP as well, the first micro-batch (local) is compared with the global batch.
    - ``"auto"`` (default): ``"ddp"`` with two or more DDP ranks, else ``"accumulation"`` when
      ``accumulate_grad_batches > 1``. Without either, the callback warns once and stays idle.

    Both terms are averaged with an EMA on device, bias-corrected, and divided when logged, as in the paper.
    Measurements are taken on logging steps only: nothing is computed on other steps, no host sync; a logging
    step costs one gradient norm (plus a tiny all-reduce under DDP) and one host transfer. The EMA is saved in
    checkpoints. Assumes a loss averaged over the batch (Lightning divides it by ``accumulate_grad_batches``)
    and equal micro-batch sizes; windows with unequal sizes are skipped.

    Logged metrics:

    - ``gradwatch/noise_scale``: ``B_simple``, in examples (rows of the batch: sequences, not tokens). Not logged
      while the averaged ``|G|^2`` is not positive (the gradient is lost in the noise).
    - ``gradwatch/noise_scale/grad_sq_norm`` and ``.../trace_sigma``: the averaged ``|G|^2`` and ``tr(Sigma)``.
    - ``gradwatch/noise_scale/batch_size``: the examples per optimizer step, to compare ``B_simple`` with.

    Args:
        source: ``"auto"``, ``"ddp"`` or ``"accumulation"`` (see above).
        ema_decay: EMA decay per measurement (one per logging step), in ``[0, 1)``.
        log_every_n_steps: measure and log every this many optimizer steps; ``None`` follows the Trainer.
        batch_size: examples per micro-batch on each rank; ``None`` reads it from each batch (as ``self.log``
            does).

    Raises:
        ValueError: for an unknown ``source`` or a value out of range.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gradwatch import GradientNoiseScale

        trainer = Trainer(callbacks=[GradientNoiseScale()], accumulate_grad_batches=4)
    """

    hook_order = HookOrder.NOISE_SCALE

    def __init__(
        self,
        source: Source = "auto",
        ema_decay: OpenUnitInterval = 0.99,
        log_every_n_steps: PositiveInt | Null = None,
        batch_size: PositiveInt | Null = None,
    ) -> None:
        super().__init__()
        self.source = check_choice("source", source, ("auto", "ddp", "accumulation"))
        self.ema_decay = check_number("ema_decay", ema_decay, gt=0, lt=1)
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, ge=1, integer=True, optional=True)
        self.batch_size = check_number("batch_size", batch_size, ge=1, integer=True, optional=True)
        self._state: Tensor | None = None
        self._loaded_state: list[float] | None = None
        self._active: str | None = None  # the resolved source for this fit, or None (idle)
        self._hook: LocalNormHookState | None = None
        self._warned = False
        # the current optimizer step's measurement: decided at its first micro-batch
        self._measure = False
        self._sizes: list[int] = []
        self._small_sq: Tensor | None = None

    # -- set-up ----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._active, why = self._resolve_source(trainer, pl_module)
        if self._active is None and not self._warned:
            self._warned = True
            rank_zero_warn(f"GradientNoiseScale is idle: {why}")

    def _resolve_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[str | None, str]:
        if not pl_module.automatic_optimization:
            return None, "it supports automatic optimization only."
        strategy = trainer.strategy
        if not isinstance(strategy, _SUPPORTED) or isinstance(strategy, _DEEPSPEED):
            return None, f"it supports single-device and DDP training only, not {type(strategy).__name__}."
        ddp_model = trainer.strategy.model if isinstance(trainer.strategy.model, DistributedDataParallel) else None
        if self.source in ("auto", "ddp") and ddp_model is not None and trainer.world_size > 1:
            self._hook = register_local_norm_hook(ddp_model)
            if self._hook is not None:
                return "ddp", ""
            if self.source == "ddp":
                return None, "another DDP communication hook is registered (DDP allows one); use source='accumulation'."
        if self.source in ("auto", "accumulation") and trainer.accumulate_grad_batches > 1:
            return "accumulation", ""
        return None, (
            "it needs two batch sizes: gradient accumulation (Trainer(accumulate_grad_batches > 1)) or DDP with two "
            f"or more ranks (source={self.source!r}, accumulate_grad_batches={trainer.accumulate_grad_batches}, "
            f"world_size={trainer.world_size})."
        )

    # -- per micro-batch -------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._active is None:
            return
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first micro-batch of an optimizer step
            self._measure = self._should_log(trainer, self.log_every_n_steps)
            self._sizes = []
            self._small_sq = None
            if self._hook is not None:
                self._hook.reset(active=self._measure and self._active == "ddp")
        if self._measure:
            self._sizes.append(self.batch_size or extract_batch_size(batch))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active != "accumulation" or not self._measure or len(self._sizes) != 1 or self._small_sq is not None:
            return
        # Lightning divides each micro-batch's loss by accumulate_grad_batches (A): after the first backward the
        # grads hold g_1 / A, so the first micro-batch's mean gradient is A times them. Local under DDP (no_sync).
        grads = [local_tensor(p.grad) for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._small_sq = global_norm(grads).square() * float(trainer.accumulate_grad_batches) ** 2

    # -- the optimizer step ----------------------------------------------------------------------------------
    @override
    def _before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepGradients,
    ) -> None:
        if self._active is None or not self._measure or step.repeat:
            return
        self._measure = False  # one measurement per optimizer step
        if not step.grads or not self._sizes:  # the same on every rank: no rank skips the all-reduce below alone
            return
        big_sq = step.global_norm(2.0).square()  # the shared pass: unscaled already (fused optimizers too)
        device = big_sq.device
        # the accumulated grads hold (1/A) * the sum of k micro-batch means: the window's mean is A/k times them
        big_sq = big_sq * (trainer.accumulate_grad_batches / len(self._sizes)) ** 2
        small_sq, b_small, b_big, ok = self._small_measurement(trainer, device)
        if trainer.world_size > 1:
            small_sq, ok = self._average_over_ranks(small_sq, ok, b_small)
        state = self._ema_state(device)
        if b_small < b_big:
            grad_sq, trace = noise_scale_terms(small_sq, big_sq, b_small, b_big)
            grad_sq = torch.where(ok, grad_sq, torch.full_like(grad_sq, float("nan")))  # NaN: the EMA skips it
            self._state = noise_scale_ema_update(state, grad_sq, trace, self.ema_decay)
        if trainer.is_global_zero:
            self._log(trainer, b_big)

    def _small_measurement(self, trainer: pl.Trainer, device: torch.device) -> tuple[Tensor, float, float, Tensor]:
        """This rank's ``|G_small|^2`` (unscaled), ``b_small``, ``b_big`` and whether the window is usable."""
        sizes, k = self._sizes, len(self._sizes)
        micro = float(sizes[0]) if sizes else 1.0
        usable = bool(sizes) and all(s == sizes[0] for s in sizes)
        world = float(trainer.world_size)
        if self._active == "ddp":
            small = self._hook.sq_norm if self._hook is not None else None
            # the buckets held (1/A) * the sum of this rank's k micro-batch means
            factor, b_small = (trainer.accumulate_grad_batches / k) ** 2, micro * k
        else:
            small, factor, b_small = self._small_sq, 1.0, micro
            usable = usable and k > 1  # a one-micro-batch window has no second batch size (and is synced)
        usable = usable and small is not None
        if small is None:
            small = torch.zeros((), device=device)
        small = small.to(device) * factor
        scaler = grad_scaler(trainer)
        scale = scale_of(scaler) if scaler is not None else None
        if scale is not None:  # measured during backward: scaled by the loss scale
            small = small / scale.to(device, torch.float32).square()
        return small, b_small, world * micro * k, torch.full((), usable, dtype=torch.bool, device=device)

    @staticmethod
    def _average_over_ranks(small_sq: Tensor, ok: Tensor, b_small: float) -> tuple[Tensor, Tensor]:
        """Average ``|G_small|^2`` over ranks (each rank's batch is an independent sample: W times less noise) in
        one tiny all-reduce; usable only if every rank's window was, with the same micro-batch size."""
        okf = ok.to(torch.float32)
        b = torch.full_like(okf, b_small)
        reduced = all_reduce_sum(torch.stack([small_sq * okf, okf, b * okf, b * b * okf]))
        world = float(torch.distributed.get_world_size())
        same_sizes = reduced[3] * world == reduced[2] * reduced[2]  # Cauchy-Schwarz: equal iff all sizes equal
        return reduced[0] / world, (reduced[1] == world) & same_sizes

    def _ema_state(self, device: torch.device) -> Tensor:
        if self._state is None:
            self._state = noise_scale_state(device)
            if self._loaded_state is not None:
                self._state.copy_(torch.tensor(self._loaded_state, dtype=torch.float32))
                self._loaded_state = None
        elif self._state.device != device:
            self._state = self._state.to(device)
        return self._state

    def _log(self, trainer: pl.Trainer, b_big: float) -> None:
        if self._state is None:
            return
        grad_sq, trace, b_simple = host_values(noise_scale_readout(self._state))[0]  # the one host sync
        metrics = {_TAGS["batch_size"]: b_big}
        if grad_sq == grad_sq:  # not NaN: something has been averaged
            metrics[_TAGS["grad_sq_norm"]] = grad_sq
            metrics[_TAGS["trace_sigma"]] = trace
        if b_simple == b_simple:
            metrics[_TAGS["noise_scale"]] = b_simple
        self._log_metrics(trainer, metrics)

    # -- TensorBoard and state -------------------------------------------------------------------------------
    @override
    def _tensorboard_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, list[Any]]]:
        def exact(*keys: str) -> list[str]:
            return [f"^{_TAGS[key]}$" for key in keys]

        return {
            "gradwatch: noise scale": {
                "noise scale B_simple and batch size (examples)": ["Multiline", exact("noise_scale", "batch_size")],
                "|G|^2 (EMA)": ["Multiline", exact("grad_sq_norm")],
                "tr(Sigma) (EMA)": ["Multiline", exact("trace_sigma")],
            }
        }

    @override
    def _extra_state(self) -> dict[str, Any]:
        state = self._state.tolist() if self._state is not None else self._loaded_state  # a sync, on saving only
        return {"noise_scale_ema": state}

    @override
    def _load_extra_state(self, state: dict[str, Any], changed: set[str]) -> list[str]:
        loaded = state.get("noise_scale_ema")
        self._loaded_state = [float(x) for x in loaded] if loaded is not None else None
        self._state = None
        return []
