"""User mistakes in training code, each with its healthy twin: small real models that train on CPU in seconds.

Each scenario is built both ways, ``build(name, broken=True)`` (the mistake) and ``build(name, broken=False)``
(the same model trained correctly), some with variants (``VARIANTS``)::

    scenario = build("detach_in_forward", broken=True, variant="no_grad")
    trainer = run("detach_in_forward", True, [GradWatch()], tmp_path, variant="no_grad")
    scenario.module.trace.loss  # the raw truth of the run, one entry per backward pass

``HEALTHY_ONLY`` scenarios (``*_intentional``, ``tiny_loss``, ``growing_norms_finetune``, ``gru_plateau``) are
healthy runs that look like a problem to a naive detector; they have no broken variant (``build(name, True)``
raises). Every module records the raw truth in ``module.trace`` from its own ``on_after_backward`` (after every
callback's, before any clipping or guard touches the gradients): the loss, the global gradient norm, each layer's
gradient norm (``None``: the layer got no gradient at all) and the fraction of gradient elements exactly zero.
Layer names are gradwatch's: a parameter's name without its last part (``net.fc1``). Every run is seeded and
deterministic on CPU. ``tests/mistakes/README.md`` lists what each scenario breaks; ``benchmarks/mistakes_sweep.py``
runs them all under ``GradWatch()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "HEALTHY_ONLY",
    "SCENARIOS",
    "VARIANTS",
    "MistakeModule",
    "Scenario",
    "Trace",
    "build",
    "run",
    "variants",
]

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
OptimizerFn = Callable[["MistakeModule"], Any]


# -- the raw truth ---------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One entry per backward pass (per optimizer step in automatic optimization)."""

    loss: list[float] = field(default_factory=list)
    global_norm: list[float] = field(default_factory=list)  # 2-norm of every gradient that exists, in fp64
    layer_norm: dict[str, list[float | None]] = field(default_factory=dict)  # None: no gradient (p.grad is None)
    zero_fraction: list[float] = field(default_factory=list)  # gradient elements exactly 0.0, of those that exist
    saturation: dict[str, list[float]] = field(default_factory=dict)  # |tanh| > 0.99 (or sigmoid near 0/1)


class MistakeModule(pl.LightningModule):
    """A network, its loss and optimizer, and a recorder of the raw truth.

    Args:
        net: the network (``self.net``); layer names start with ``net.``.
        loss_fn: ``(net, batch) -> loss``.
        optimizer: ``module -> optimizer`` (or Lightning's dict with a scheduler): where a mistake in
            ``configure_optimizers`` lives.
        saturation: names of tanh/sigmoid modules whose saturated fraction is recorded on every training step.
    """

    def __init__(self, net: nn.Module, loss_fn: LossFn, optimizer: OptimizerFn, saturation: Sequence[str] = ()) -> None:
        super().__init__()
        self.net, self.loss_fn, self.make_optimizer = net, loss_fn, optimizer
        self.trace = Trace()
        for name in saturation:
            self.get_submodule(name).register_forward_hook(self._saturation_hook(name))

    def forward(self, *args: Tensor) -> Tensor:
        return self.net(*args)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.net, tuple(batch))
        self.trace.loss.append(float(loss.detach().float()))
        return loss

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self)

    def on_after_backward(self) -> None:
        by_layer: dict[str, list[Tensor | None]] = {}
        for name, p in self.named_parameters():
            by_layer.setdefault(name.rsplit(".", 1)[0], []).append(None if p.grad is None else p.grad.detach())
        total, zeros, count = 0.0, 0, 0
        for layer, grads in by_layer.items():
            present = [g.double().reshape(-1) for g in grads if g is not None]
            if not present:
                self.trace.layer_norm.setdefault(layer, []).append(None)
                continue
            g = torch.cat(present)
            norm = float(g.norm())
            self.trace.layer_norm.setdefault(layer, []).append(norm)
            total += norm**2
            zeros += int((g == 0).sum())
            count += g.numel()
        self.trace.global_norm.append(math.sqrt(total))
        self.trace.zero_fraction.append(zeros / count if count else 1.0)

    def _saturation_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if self.training and self._trainer is not None and self.trainer.training:
                out = out.detach().float()
                far = (out.abs() > 0.99) if isinstance(module, nn.Tanh) else ((out < 0.01) | (out > 0.99))
                self.trace.saturation.setdefault(name, []).append(float(far.float().mean()))

        return hook


@dataclass
class Scenario:
    """Everything needed to run a scenario: ``run()`` fits ``module`` on ``train_dataloader`` for ``max_steps``
    optimizer steps with ``trainer_kwargs`` added to the common Trainer arguments."""

    name: str
    broken: bool
    variant: str
    module: MistakeModule
    train_dataloader: DataLoader
    trainer_kwargs: dict[str, Any]
    max_steps: int
    what: str  # one line: what is wrong (or why this healthy run is healthy)


# -- data ------------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loader(dataset: TensorDataset, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=_gen(seed))


def teacher_classes(n: int, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Labels from a fixed random linear teacher on Gaussian inputs (learnable, not separable)."""
    x = torch.randn(n, features, generator=_gen(seed))
    y = (x @ torch.randn(features, classes, generator=_gen(1234))).argmax(dim=1)
    return TensorDataset(x, y)


def markov_tokens(n: int, vocab: int, seq_len: int, successors: int = 4, seed: int = 0) -> TensorDataset:
    """Token sequences from a sparse random Markov chain: each token has ``successors`` possible successors, so
    a language model's loss falls from ``ln(vocab)`` towards about ``ln(successors)``."""
    g = _gen(seed)
    nxt = torch.randint(vocab, (vocab, successors), generator=_gen(1234))
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=g)
    for pos in range(1, seq_len):
        pick = torch.randint(successors, (n,), generator=g)
        tokens[:, pos] = nxt[tokens[:, pos - 1], pick]
    return TensorDataset(tokens)


def pixel_images(n: int, side: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    """8-bit grey images (integers 0-255 as float32): class templates under noise, flattened."""
    g = _gen(seed)
    templates = torch.rand(classes, side * side, generator=_gen(1234))
    y = torch.randint(classes, (n,), generator=g)
    x = (templates[y] + 0.35 * torch.randn(n, side * side, generator=g)).clamp(0, 1)
    return TensorDataset((x * 255).round(), y)


def first_step_sequences(n: int, seq_len: int, features: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Noise sequences whose class is set by their first step alone: a recurrent net sits on a plateau until it
    learns to carry it to the end."""
    x = torch.randn(n, seq_len, features, generator=_gen(seed))
    return TensorDataset(x, (x[:, 0] @ torch.randn(features, classes, generator=_gen(1234))).argmax(dim=1))


def bag_of_words(n: int, vocab: int, seq_len: int, seed: int = 0) -> TensorDataset:
    """Token sequences (token 0, the [CLS] slot, at position 0) labelled by the sign of a fixed random linear
    teacher over their token counts."""
    w = torch.randn(vocab, generator=_gen(1234))
    w[0] = 0.0
    tokens = torch.randint(1, vocab, (n, seq_len), generator=_gen(seed))
    tokens[:, 0] = 0
    return TensorDataset(tokens, (w[tokens].sum(dim=1) > 0).long())


# -- losses ----------------------------------------------------------------------------------------------------
def classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return F.cross_entropy(net(batch[0]), batch[1])


def next_token(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    tokens = batch[0]
    logits = net(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def demo_next_token(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """``lightning.pytorch.demos.LightningTransformer.training_step`` (:class:`DemoTransformer`): the model returns
    log-probabilities."""
    tokens = batch[0]
    inputs, target = tokens[:, :-1], tokens[:, 1:]
    return F.nll_loss(net(inputs, target), target.reshape(-1))


def regress(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return F.mse_loss(net(batch[0]), batch[1])


# -- models ----------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, the causal mask a ``-inf`` buffer added to the scores."""

    def __init__(self, d: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), 1))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads) + self.mask[:t, :t]
        return self.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads, seq_len)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """A small pre-LayerNorm GPT-style language model, hand-written."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 4, seq_len: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.Sequential(*[Block(d, heads, seq_len) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.ln_f(self.blocks(x)))


class EncoderClassifier(nn.Module):
    """A BERT-style encoder (post-LayerNorm, GELU, learned positions, embedding LayerNorm) classifying from the
    [CLS] position through a tanh pooler, as BertForSequenceClassification does."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 4, seq_len: int = 32) -> None:
        super().__init__()
        self.tok, self.pos, self.ln = nn.Embedding(vocab, d), nn.Embedding(seq_len, d), nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler, self.head = nn.Linear(d, d), nn.Linear(d, 2)
        for module in self.modules():  # BERT's initialisation: N(0, 0.02^2) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for layer in self.encoder.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=0.02)
            nn.init.zeros_(layer.self_attn.in_proj_bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.ln(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        return self.head(torch.tanh(self.pooler(self.encoder(x)[:, 0])))


class EncoderHead(nn.Module):
    """``encoder`` (fc1, ReLU, fc2, ReLU) then ``head``; ``cut`` places a ``.detach()`` or a ``torch.no_grad()``
    block between them (the mistake) or nothing; ``aux`` adds an auxiliary head that forward never uses."""

    def __init__(self, features: int = 16, width: int = 32, classes: int = 4, cut: str = "", aux: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
        self.pooler = nn.Linear(width, width) if aux else None  # registered, optimized, never in forward
        self.cut = cut

    def forward(self, x: Tensor) -> Tensor:
        if self.cut == "no_grad":
            with torch.no_grad():
                h = self.encoder(x)
        else:
            h = self.encoder(x)
            if self.cut == "detach":
                h = h.detach()
        return self.head(h)


class DemoTransformer(nn.Module):
    """The shape of ``lightning.pytorch.demos.Transformer`` (an ``nn.Transformer`` encoder-decoder language model
    returning log-probabilities), defined here: the demo's positional encoding changed between Lightning 2.4 and
    2.6, and the scenario must make the same mistake with the same numbers on every Lightning we support."""

    def __init__(self, vocab_size: int, width: int, heads: int, hidden: int, layers: int, max_len: int = 512) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
        table = torch.zeros(max_len, width)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
        self.register_buffer("positions", table, persistent=False)
        self.embedding = nn.Embedding(vocab_size, width)
        self.transformer = nn.Transformer(
            d_model=width,
            nhead=heads,
            num_encoder_layers=layers,
            num_decoder_layers=layers,
            dim_feedforward=hidden,
            dropout=0.0,
            batch_first=True,
        )
        self.decoder = nn.Linear(width, vocab_size)
        self.width, self.vocab_size = width, vocab_size

    def forward(self, inputs: Tensor, target: Tensor) -> Tensor:
        t = inputs.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=inputs.device)
        scale, positions = math.sqrt(self.width), self.positions[:t]
        src = self.embedding(inputs) * scale + positions
        tgt = self.embedding(target) * scale + positions
        out = self.decoder(self.transformer(src, tgt, tgt_mask=causal))
        return F.log_softmax(out, dim=-1).view(-1, self.vocab_size)


def deep_mlp(depth: int, width: int, act: type[nn.Module], init_std: float | None, features: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = features
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if init_std is not None:
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        layers += [linear, act()]
        d = width
    layers.append(nn.Linear(d, 4))
    return nn.Sequential(*layers)


class GRUClassifier(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(features, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x)[0][:, -1])


class HalfInputs(nn.Module):
    """Casts its (float) input to the network's dtype: what a user of ``model.half()`` writes in forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(next(self.net.parameters()).dtype)).float()


# -- optimizers ------------------------------------------------------------------------------------------------
def adam(lr: float, params: Callable[[MistakeModule], Any] | None = None) -> OptimizerFn:
    return lambda m: torch.optim.Adam(m.parameters() if params is None else params(m), lr=lr)


def sgd(lr: float, momentum: float = 0.0) -> OptimizerFn:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def adamw_warmup_linear(lr: float, total: int, warmup: float = 0.1, weight_decay: float = 0.01) -> OptimizerFn:
    """The transformers fine-tuning recipe: AdamW, no decay on 1-D parameters, linear warm-up then linear decay."""

    def make(m: MistakeModule) -> Any:
        params = list(m.parameters())
        opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=lr,
        )
        warm = max(1, int(warmup * total))
        factor = lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return make


# -- manual optimization ---------------------------------------------------------------------------------------
class ManualModule(MistakeModule):
    """Manual optimization: backward on every batch; ``optimizer.step()`` every ``accumulate`` batches, then
    ``zero_grad()`` if ``zero_grad`` (the mistake: never)."""

    def __init__(self, *args: Any, zero_grad: bool = True, accumulate: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.zero_grad_after_step, self.accumulate = zero_grad, accumulate

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        loss = self.loss_fn(self.net, tuple(batch))
        self.trace.loss.append(float(loss.detach()))
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            if self.zero_grad_after_step:
                opt.zero_grad()
        return loss.detach()


# -- the scenarios ---------------------------------------------------------------------------------------------
#: name -> (broken variants, healthy variants); the first of each is the default.
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lr_too_high_adam": (("",), ("",)),
    "lr_too_high_sgd": (("",), ("",)),
    "deep_sigmoid_30": (("",), ("",)),
    "layer_not_in_optimizer": (("",), ("",)),
    "detach_in_forward": (("detach", "no_grad"), ("",)),
    "grads_never_reset": (("",), ("", "accumulate_4")),
    "fp16_without_scaling": (("16-true", "half"), ("bf16-true", "32-true")),
    "unnormalised_inputs": (("",), ("scaled", "standardised")),
    "frozen_backbone_intentional": ((), ("",)),
    "unused_branch_intentional": ((), ("",)),
    "tiny_loss": ((), ("",)),
    "growing_norms_finetune": ((), ("",)),
    "gru_plateau": ((), ("",)),
    "nan_loss_stuck": (("",), ("",)),
}
SCENARIOS: tuple[str, ...] = tuple(VARIANTS)
HEALTHY_ONLY: frozenset[str] = frozenset(name for name, (broken, _) in VARIANTS.items() if not broken)


def variants(name: str, broken: bool) -> tuple[str, ...]:
    """The variants of ``name`` built with ``broken`` (``()``: a healthy-only scenario asked for broken)."""
    return VARIANTS[name][0 if broken else 1]


def _lr_too_high_adam(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net = CausalLM()
    data = markov_tokens(2048, vocab=64, seq_len=33)
    module = MistakeModule(net, next_token, adam(3e-1 if broken else 3e-3))
    what = "Adam at lr 0.3 (100x its usual 3e-3)" if broken else "Adam at lr 3e-3"
    return module, _loader(data, 16), {}, 150, what


def _lr_too_high_sgd(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net = DemoTransformer(vocab_size=1000, width=32, heads=2, hidden=64, layers=2)
    data = markov_tokens(2048, vocab=1000, seq_len=21)
    module = MistakeModule(net, demo_next_token, sgd(20.0 if broken else 0.1))
    what = "SGD at lr 20 (200x the demo's 0.1)" if broken else "SGD at lr 0.1 (the demo's)"
    return module, _loader(data, 16), {}, 100, what


def _deep_sigmoid_30(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    if broken:
        net = deep_mlp(30, 32, nn.Sigmoid, init_std=0.01)
        what = "30 Linear+Sigmoid layers, weights N(0, 0.01^2): the first layers' gradients underflow to 0.0"
    else:
        net = deep_mlp(4, 32, nn.Sigmoid, init_std=None)
        what = "4 Linear+Sigmoid layers, PyTorch's default init"
    sat = [f"net.{2 * i + 1}" for i in range(0, len(net) // 2, 1 if not broken else 10)]
    return MistakeModule(net, classify, adam(1e-2), saturation=sat), _loader(teacher_classes(2048), 32), {}, 100, what


def _layer_not_in_optimizer(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net = EncoderHead()
    params = (lambda m: m.net.encoder.parameters()) if broken else None
    what = "configure_optimizers passes only self.net.encoder.parameters(): the head never moves" if broken else ""
    return MistakeModule(net, classify, adam(3e-3, params)), _loader(teacher_classes(2048), 32), {}, 100, what


def _detach_in_forward(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net = EncoderHead(cut=variant if broken else "")
    what = {"detach": "h = self.encoder(x).detach()", "no_grad": "with torch.no_grad(): h = self.encoder(x)"}
    return (
        MistakeModule(net, classify, adam(3e-3)),
        _loader(teacher_classes(2048), 32),
        {},
        100,
        what.get(variant, "") + (": the encoder never receives a gradient" if broken else ""),
    )


def _grads_never_reset(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    accumulate = 4 if variant == "accumulate_4" else 1
    module = ManualModule(
        deep_mlp(2, 32, nn.ReLU, None), classify, sgd(0.05, momentum=0.9), zero_grad=not broken, accumulate=accumulate
    )
    what = (
        "manual optimization, optimizer.zero_grad() never called: every step applies the sum of all past gradients"
        if broken
        else "manual optimization, zero_grad() after each step"
        + (" (gradient accumulation: step + zero_grad every 4th batch, loss / 4)" if accumulate > 1 else "")
    )
    return module, _loader(teacher_classes(2048), 32), {}, 100 if accumulate == 1 else 40, what


class SmallTargetRegressor(nn.Module):
    """A tanh MLP regressing a small-scale target (units where values are ~3e-3) with its output layer initialised
    small (std 3e-3), as is common: the backward pass through that head scales every lower gradient by ~3e-3."""

    def __init__(self, features: int = 32, width: int = 64, outputs: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(features, width), nn.Linear(width, width), nn.Linear(width, outputs)
        nn.init.normal_(self.head.weight, std=3e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def small_targets(n: int, features: int = 32, outputs: int = 8, scale: float = 3e-3, seed: int = 0) -> TensorDataset:
    x = torch.randn(n, features, generator=_gen(seed))
    teacher = torch.randn(features, outputs, generator=_gen(1234)) / math.sqrt(features)
    return TensorDataset(x, scale * torch.tanh(x @ teacher))


def _fp16_without_scaling(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net: nn.Module = SmallTargetRegressor()
    kwargs: dict[str, Any] = {}
    if variant == "half":
        net = HalfInputs(net.half())
        what = "model.half() under precision 32-true (no GradScaler): the lower layers' gradients flush to 0"
    else:
        kwargs["precision"] = variant
        what = f"precision={variant!r}" + (" (no GradScaler): the lower layers' gradients flush to 0" if broken else "")
    module = MistakeModule(net, regress, sgd(0.5, momentum=0.9))
    return module, _loader(small_targets(8192), 2048), kwargs, 60, what


def _unnormalised_inputs(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    data = pixel_images(4096)
    x, y = data.tensors
    if not broken:
        x = x / 255.0 if variant == "scaled" else (x - x.mean()) / x.std()
    net = deep_mlp(3, 32, nn.Tanh, None, features=64)
    what = (
        "8-bit pixels (0-255) fed to a tanh MLP"
        if broken
        else f"pixels {variant}" + (" to [0, 1]" if variant == "scaled" else " (zero mean, unit variance)")
    )
    module = MistakeModule(net, classify, adam(1e-3), saturation=("net.1", "net.3", "net.5"))
    return module, _loader(TensorDataset(x, y), 32), {}, 100, what


def _frozen_backbone_intentional(
    broken: bool, variant: str
) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    net = EncoderHead()
    net.encoder.requires_grad_(False)
    module = MistakeModule(net, classify, adam(3e-3, lambda m: m.net.head.parameters()))
    what = "encoder.requires_grad_(False), only the head in the optimizer: a frozen backbone, on purpose"
    return module, _loader(teacher_classes(2048), 32), {}, 100, what


def _unused_branch_intentional(
    broken: bool, variant: str
) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    module = MistakeModule(EncoderHead(aux=True), classify, adam(3e-3))
    what = "an auxiliary head (net.pooler) that forward never uses, in the optimizer (a pretrained model's pooler)"
    return module, _loader(teacher_classes(2048), 32), {}, 100, what


def _tiny_loss(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    g = _gen(0)
    y = torch.randint(4, (2048,), generator=g)
    centres = 6.0 * torch.randn(4, 16, generator=_gen(1234))
    x = centres[y] + torch.randn(2048, 16, generator=g)  # well separated classes
    module = MistakeModule(deep_mlp(2, 32, nn.ReLU, None), classify, adam(5e-3))
    what = "well separated classes, Adam 5e-3: the loss falls to ~1e-5, healthy"
    return module, _loader(TensorDataset(x, y), 32), {}, 300, what


def _growing_norms_finetune(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    tokens, y = bag_of_words(4096, vocab=64, seq_len=32).tensors
    noisy = torch.rand(len(y), generator=_gen(5)) < 0.05  # 5% label noise, as in any real labelled set
    data = TensorDataset(tokens, torch.where(noisy, 1 - y, y))
    module = MistakeModule(EncoderClassifier(), classify, adamw_warmup_linear(3e-3, 150))
    what = (
        "BERT-style encoder (BERT init) fine-tuned with AdamW, warm-up + linear decay, 5% label noise: the gradient "
        "norm grows as the loss falls"
    )
    return module, _loader(data, 32), {}, 150, what


def _gru_plateau(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    module = MistakeModule(GRUClassifier(hidden=64), classify, adam(3e-3))
    what = "a GRU on a memory task: a plateau, then the gradient norm jumps as it learns to remember"
    return module, _loader(first_step_sequences(4096, seq_len=12), 32), {}, 300, what


def _nan_loss_stuck(broken: bool, variant: str) -> tuple[MistakeModule, DataLoader, dict[str, Any], int, str]:
    x, y = teacher_classes(32 * 120).tensors
    if broken:
        x = x.clone()
        x[32 * 10 : 32 * 70] = math.nan  # batches 10-69: a corrupted shard of the data set
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)  # in order: the shard is consecutive
    module = MistakeModule(deep_mlp(2, 32, nn.ReLU, None), classify, adam(5e-3))
    what = "batches 10-69 hold NaN inputs (a corrupted shard): the loss is NaN on 60 steps in a row" if broken else ""
    return module, loader, {}, 120, what


_BUILDERS: dict[str, Callable[[bool, str], tuple[MistakeModule, DataLoader, dict[str, Any], int, str]]] = {
    "lr_too_high_adam": _lr_too_high_adam,
    "lr_too_high_sgd": _lr_too_high_sgd,
    "deep_sigmoid_30": _deep_sigmoid_30,
    "layer_not_in_optimizer": _layer_not_in_optimizer,
    "detach_in_forward": _detach_in_forward,
    "grads_never_reset": _grads_never_reset,
    "fp16_without_scaling": _fp16_without_scaling,
    "unnormalised_inputs": _unnormalised_inputs,
    "frozen_backbone_intentional": _frozen_backbone_intentional,
    "unused_branch_intentional": _unused_branch_intentional,
    "tiny_loss": _tiny_loss,
    "growing_norms_finetune": _growing_norms_finetune,
    "gru_plateau": _gru_plateau,
    "nan_loss_stuck": _nan_loss_stuck,
}


def build(name: str, broken: bool, variant: str | None = None, seed: int = 0) -> Scenario:
    """The scenario ``name``, the mistake (``broken=True``) or its healthy twin; ``variant`` one of
    ``variants(name, broken)`` (default: the first)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    allowed = variants(name, broken)
    if not allowed:
        raise ValueError(f"{name!r} is a healthy run only: it has no broken variant")
    variant = allowed[0] if variant is None else variant
    if variant not in allowed:
        raise ValueError(f"{name!r} (broken={broken}) has variants {allowed}, not {variant!r}")
    torch.manual_seed(seed)
    module, loader, kwargs, steps, what = _BUILDERS[name](broken, variant)
    return Scenario(name, broken, variant, module, loader, kwargs, steps, what)


def fit(scenario: Scenario, callbacks: Sequence[Any], tmp_path: str | Path, **overrides: Any) -> pl.Trainer:
    """Fit a built scenario as a user would (the Trainer's defaults, a TensorBoard logger), quietly, on CPU."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=scenario.max_steps,
        logger=TensorBoardLogger(str(tmp_path), name=scenario.name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **scenario.trainer_kwargs,
    )
    trainer = pl.Trainer(**{**kwargs, **overrides})
    trainer.fit(scenario.module, train_dataloaders=scenario.train_dataloader)
    return trainer


def run(
    name: str, broken: bool, callbacks: Sequence[Any], tmp_path: str | Path, variant: str | None = None
) -> pl.Trainer:
    """Build ``name`` and fit it with ``callbacks``; the module (and its ``trace``) is ``trainer.lightning_module``."""
    return fit(build(name, broken, variant), callbacks, tmp_path)


def fp16_underflow(net: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, ...]) -> dict[str, float]:
    """The fraction of gradient elements that are non-zero in fp32 but exactly zero when the same network (same
    weights, same batch) runs in fp16, per layer and ``""`` for all: what half precision without a GradScaler
    flushes to zero."""
    import copy

    grads = {}
    for dtype in (torch.float32, torch.float16):
        copied = copy.deepcopy(net).to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
        loss_fn(copied, inputs).float().backward()
        grads[dtype] = {n: p.grad.float() for n, p in copied.named_parameters() if p.grad is not None}
    lost: dict[str, list[int]] = {"": [0, 0]}
    for name, g32 in grads[torch.float32].items():
        g16 = grads[torch.float16][name]
        layer = lost.setdefault(name.rsplit(".", 1)[0], [0, 0])
        for counts in (layer, lost[""]):
            counts[0] += int(((g32 != 0) & (g16 == 0)).sum())
            counts[1] += int((g32 != 0).sum())
    return {name: flushed / max(1, nonzero) for name, (flushed, nonzero) in lost.items()}
