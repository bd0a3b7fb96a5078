"""The real architectures (torchvision, timm, Hugging Face transformers, and classic PyTorch nets), each with its
usual training recipe scaled to a small CPU run, and one function that fits a case.

Shared by ``tests/real_models/test_real_models.py`` (GradWatch() must stay silent) and
``benchmarks/calibrate_real_models.py`` (raw measurements for calibrating the detectors' defaults). Libraries
are imported inside the builders, so a missing one only skips its cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

from tests.models import MemoryLogger  # noqa: F401  (re-exported: benchmarks/real_model_sweep.py)
from tests.real_models import data
from tests.real_models.tasks import VAE, GANTask, RealTask, Recipe, vae_loss

VOCAB, SEQ = 64, 32


# -- losses ------------------------------------------------------------------------------------------------------
def classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return F.cross_entropy(net(batch[0]), batch[1])


def segment(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return F.cross_entropy(net(batch[0])["out"], batch[1])


def hf_language_model(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[0], labels=batch[0]).loss


def hf_classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss


def hf_token_classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[0], labels=batch[1]).loss


def next_token(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    tokens = batch[0]
    logits = net(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# -- classic PyTorch nets ----------------------------------------------------------------------------------------
class LSTMLanguageModel(nn.Module):
    """PyTorch's word_language_model example, small: embedding, 2-layer LSTM with dropout, linear decoder;
    ``tied`` (its ``--tied``): the decoder shares the embedding's weight (then ``hidden`` must equal ``embed``)."""

    def __init__(
        self, vocab: int = VOCAB, embed: int = 64, hidden: int = 128, dropout: float = 0.2, tied: bool = False
    ) -> None:
        super().__init__()
        self.embed, self.drop = nn.Embedding(vocab, embed), nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        if tied:
            self.decoder.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.drop(self.embed(tokens)))
        return self.decoder(self.drop(out))


class GRUClassifier(nn.Module):
    """A 1-layer GRU reading a sequence, classifying from its last hidden state."""

    def __init__(self, features: int = 8, hidden: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class CausalSelfAttention(nn.Module):
    """GPT-2's attention, hand-written: one ``c_attn`` projection to q, k, v, the causal mask a buffer made the
    usual way (``nn.Transformer.generate_square_subsequent_mask``: ``-inf`` above the diagonal, 0 elsewhere)."""

    def __init__(self, d: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:t, :t])
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads, seq_len)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate="tanh"))


class HandWrittenGPT(nn.Module):
    """A GPT written by hand as in nanoGPT: pre-LayerNorm blocks, tied input and output embeddings, GPT-2's
    initialisation (N(0, 0.02^2), the residual projections scaled by 1/sqrt(2 * layers), zero biases)."""

    def __init__(self, vocab: int = VOCAB, seq_len: int = SEQ, d: int = 64, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.h = nn.ModuleList(GPTBlock(d, heads, seq_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# -- builders ----------------------------------------------------------------------------------------------------
def _images(net: nn.Module, recipe: Recipe, batch_size: int, size: int = 32) -> RealTask:
    train, held_out = data.class_images(2048, seed=1, size=size), data.class_images(256, seed=2, size=size)
    return RealTask(net, classify, train, held_out, recipe, batch_size)


def resnet18() -> RealTask:
    import torchvision

    # the CIFAR recipe: SGD momentum 0.9, weight decay 5e-4, cosine schedule; lr 0.1 at batch 128, scaled
    recipe = Recipe("sgd", lr=0.1 * 8 / 128, weight_decay=5e-4, schedule="cosine")
    return _images(torchvision.models.resnet18(num_classes=10), recipe, batch_size=8)


def mobilenet_v3_small() -> RealTask:
    import torchvision

    # torchvision's MobileNetV3 reference (RMSprop, eps 0.0316, wd 1e-5), lr scaled from 0.064 at batch 1024
    recipe = Recipe("rmsprop", lr=0.064 * 16 / 1024, weight_decay=1e-5, eps=0.0316, schedule="cosine")
    return _images(torchvision.models.mobilenet_v3_small(num_classes=10), recipe, batch_size=16)


def lraspp_mobilenet_v3() -> RealTask:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    net = lraspp_mobilenet_v3_large(num_classes=3, weights=None, weights_backbone=None)
    # torchvision's segmentation reference: SGD momentum 0.9, wd 1e-4, polynomial decay; lr 0.02 at batch 32
    recipe = Recipe("sgd", lr=0.02 * 8 / 32, weight_decay=1e-4, schedule="poly")
    train, held_out = data.segmentation_images(512, seed=1), data.segmentation_images(64, seed=2)
    return RealTask(net, segment, train, held_out, recipe, batch_size=8)


def convnext_atto() -> RealTask:
    import timm

    net = timm.create_model("convnext_atto", num_classes=10, depths=(1, 1, 2, 1))  # atto widths, fewer blocks
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.05, schedule="warmup_cosine", warmup=0.1)
    return _images(net, recipe, batch_size=16)


def vit_tiny() -> RealTask:
    import timm

    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=4)
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.05, schedule="warmup_cosine", warmup=0.1)
    return _images(net, recipe, batch_size=16)


def tinynet_e() -> RealTask:
    import timm

    # TinyNet-E: timm's EfficientNet class scaled down (SiLU, squeeze-excitation, BatchNorm, 0.8M parameters)
    net = timm.create_model("tinynet_e", num_classes=10)
    # timm's EfficientNet recipe: RMSpropTF, eps 1e-3, wd 1e-5, warm-up, cosine; lr 0.048 at batch 384, scaled
    recipe = Recipe("rmsproptf", lr=0.048 * 16 / 384, weight_decay=1e-5, eps=1e-3, schedule="warmup_cosine", warmup=0.1)
    return _images(net, recipe, batch_size=16)


def gpt2(n_layer: int = 2, n_embd: int = 64) -> RealTask:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=n_embd, n_layer=n_layer, n_head=4, bos_token_id=0, eos_token_id=0
    )
    # the GPT recipe: AdamW betas (0.9, 0.95), wd 0.1, linear warm-up then cosine decay
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), schedule="warmup_cosine", warmup=0.1)
    train, held_out = data.markov_tokens(4096, seed=1), data.markov_tokens(256, seed=2)
    return RealTask(GPT2LMHeadModel(config), hf_language_model, train, held_out, recipe, batch_size=16)


def gpt_handwritten() -> RealTask:
    # the GPT recipe, as for gpt2: AdamW betas (0.9, 0.95), wd 0.1, linear warm-up then cosine decay
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), schedule="warmup_cosine", warmup=0.1)
    train, held_out = (
        data.markov_tokens(4096, seed=1, seq_len=SEQ + 1),
        data.markov_tokens(256, seed=2, seq_len=SEQ + 1),
    )
    return RealTask(HandWrittenGPT(), next_token, train, held_out, recipe, batch_size=16)


def bert_classifier() -> RealTask:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    # the transformers recipe: AdamW, wd 0.01, linear warm-up (10%) then linear decay
    recipe = Recipe("adamw", lr=5e-4, weight_decay=0.01, schedule="warmup_linear", warmup=0.1)
    train, held_out = data.bag_of_words(4096, seed=1), data.bag_of_words(256, seed=2)
    return RealTask(BertForSequenceClassification(config), hf_classify, train, held_out, recipe, batch_size=32)


def bert_token_classifier() -> RealTask:
    from transformers import BertConfig, BertForTokenClassification
    from transformers.models.bert.modeling_bert import BertPooler

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=SEQ,
        num_labels=3,
    )
    net = BertForTokenClassification(config)
    # a pooler that runs in forward and nobody reads, as with AutoModel plus a token head: it gets no gradient
    net.bert.pooler = BertPooler(config)
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.01, schedule="warmup_linear", warmup=0.1)
    train, held_out = data.token_tags(4096, seed=1), data.token_tags(256, seed=2)
    return RealTask(net, hf_token_classify, train, held_out, recipe, batch_size=32)


def distilbert_classifier() -> RealTask:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    # its head is Linear -> ReLU -> Linear over the [CLS] vector: a ReLU layer that sheds units as it trains
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=256,
        max_position_embeddings=SEQ,
        num_labels=2,
        pad_token_id=0,
    )
    recipe = Recipe("adamw", lr=5e-4, weight_decay=0.01, schedule="warmup_linear", warmup=0.1)
    train, held_out = data.bag_of_words(4096, seed=1), data.bag_of_words(256, seed=2)
    return RealTask(DistilBertForSequenceClassification(config), hf_classify, train, held_out, recipe, batch_size=32)


def lstm_language_model(tied: bool = False) -> RealTask:
    # word_language_model's recipe is plain SGD at lr 20 with gradient clipping (the Trainer's, see CASES); tied,
    # its loss jumps from 4.4 to 7.4 at step 1 and is back below its start by step 9
    recipe = Recipe("sgd", lr=20.0, momentum=0.0)
    train, held_out = data.markov_tokens(4096, seed=1), data.markov_tokens(256, seed=2)
    net = LSTMLanguageModel(embed=128, hidden=128, tied=True) if tied else LSTMLanguageModel()
    return RealTask(net, next_token, train, held_out, recipe, batch_size=32)


def vae(hidden: tuple[int, ...] = (400,), lr: float = 1e-3) -> RealTask:
    # PyTorch's examples/vae: 400 hidden ReLU units, latent 20, Adam 1e-3, batch 128
    train, held_out = data.binary_shapes(4096, seed=1), data.binary_shapes(256, seed=2)
    return RealTask(VAE(hidden=hidden), vae_loss, train, held_out, Recipe("adam", lr=lr), batch_size=128)


def gan() -> GANTask:
    return GANTask(data.ring_of_gaussians(8192, seed=1))


def gru_classifier() -> RealTask:
    train = data.first_step_sequences(4096, seed=1, seq_len=12)
    held_out = data.first_step_sequences(256, seed=2, seq_len=12)
    return RealTask(GRUClassifier(), classify, train, held_out, Recipe("adam", lr=3e-3), batch_size=32)


def fp16_plugins() -> dict[str, Any]:
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


@dataclass(frozen=True)
class Case:
    """One real model: its builder, the libraries it needs, its step count and extra Trainer arguments."""

    name: str
    build: Callable[[], pl.LightningModule]
    requires: tuple[str, ...] = ()
    max_steps: int = 200
    trainer: Callable[[], dict[str, Any]] = field(default=dict)
    #: activation metrics the model must produce (``"dead_fraction"``: hidden rectifiers after a Linear/Conv;
    #: ``"saturation"``: hidden sigmoid/tanh): the activation checks must have run on them
    watched: tuple[str, ...] = ()


CASES: list[Case] = [
    Case("resnet18", resnet18, ("torchvision",), watched=("dead_fraction",)),
    Case("mobilenet_v3_small", mobilenet_v3_small, ("torchvision",), watched=("dead_fraction",)),
    Case("lraspp_mobilenet_v3", lraspp_mobilenet_v3, ("torchvision",), watched=("dead_fraction", "saturation")),
    Case("convnext_atto", convnext_atto, ("timm",)),
    Case("vit_tiny", vit_tiny, ("timm",)),
    Case("tinynet_e", tinynet_e, ("timm",), watched=("saturation",)),  # SE gates: sigmoid
    Case("gpt2", gpt2, ("transformers",)),
    Case("gpt2_fp16", gpt2, ("transformers",), max_steps=150, trainer=fp16_plugins),  # CPU fp16 is slow
    Case("gpt_handwritten", gpt_handwritten),  # its causal mask: a buffer holding -inf
    Case("bert_classifier", bert_classifier, ("transformers",), watched=("saturation",)),  # pooler: tanh
    Case("bert_token_classifier", bert_token_classifier, ("transformers",)),  # its pooler: a dead end, info
    Case("distilbert_classifier", distilbert_classifier, ("transformers",), watched=("dead_fraction",)),  # ReLU head
    Case("lstm_lm_clipped", lstm_language_model, trainer=lambda: {"gradient_clip_val": 0.25}),
    Case("lstm_lm_tied", lambda: lstm_language_model(tied=True), trainer=lambda: {"gradient_clip_val": 0.25}),
    Case("vae", vae, max_steps=300, watched=("dead_fraction",)),
    Case("gan", gan, max_steps=600, watched=("dead_fraction",)),  # manual optimization: two optimizer steps per batch
    Case("gru_classifier", gru_classifier, max_steps=400),
]
CASES_BY_NAME = {case.name: case for case in CASES}


@dataclass
class FitResult:
    task: pl.LightningModule
    logger: MemoryLogger
    quality_before: float
    quality_after: float
    seconds: float
    cpu_seconds: float  # process CPU time of the fit: robust to a shared machine, unlike ``seconds``

    @property
    def losses(self) -> list[float]:
        return self.task.loss_curve()


def fit(
    case: Case, root: str | Path, callbacks: Sequence[Callback], seed: int = 0, log_every_n_steps: int = 10
) -> FitResult:
    """Build ``case`` with a fixed seed and run a real ``Trainer.fit`` on CPU with ``callbacks``."""
    pl.seed_everything(seed, verbose=False)
    task = case.build()
    quality_before = task.quality()
    logger = MemoryLogger()
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=case.max_steps,
        log_every_n_steps=log_every_n_steps,
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **case.trainer(),
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(task)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return FitResult(task, logger, quality_before, task.quality(), seconds, cpu_seconds)
