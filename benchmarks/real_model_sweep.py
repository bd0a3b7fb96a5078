"""GradWatch() at its defaults on real architectures it was not calibrated on, healthy and with real user faults.

Each case is a real ``Trainer.fit`` on CPU with synthetic, learnable data (teacher labels, a Markov chain's next
token, a copy task), the architecture's usual optimizer recipe, small sizes and 50-100 steps. Prints, per case, the
loss (mean of the first and last tenth of the steps) and every alert GradWatch raised.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/real_model_sweep.py [--cases NAME ...]``; the findings are in
benchmarks/RESULTS_calibration.md (the sweep section).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tests.real_models.shim import ensure_torchvision_loads

ensure_torchvision_loads()

import lightning.pytorch as pl  # noqa: E402

from lightning_gradwatch import GradWatch  # noqa: E402
from tests.real_models import data  # noqa: E402
from tests.real_models.models import (  # noqa: E402
    VOCAB,
    MemoryLogger,
    classify,
    gpt2,
    hf_classify,
    hf_language_model,
    next_token,
    segment,
)
from tests.real_models.tasks import RealTask, Recipe  # noqa: E402

SEQ = 32
ADAMW_TF = Recipe("adamw", lr=5e-4, weight_decay=0.01, schedule="warmup_linear", warmup=0.1)
ADAMW_GPT = Recipe("adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), schedule="warmup_cosine", warmup=0.1)
ADAMW_VIS = Recipe("adamw", lr=1e-3, weight_decay=0.05, schedule="warmup_cosine", warmup=0.1)


# -- a task with the faults users make -------------------------------------------------------------------------
class SweepTask(RealTask):
    """A RealTask that can leave parameters out of its optimizer or never zero its gradients."""

    def __init__(self, *args: Any, exclude: str | None = None, no_zero_grad: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exclude = exclude
        if no_zero_grad:
            self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = self.loss_fn(self.net, tuple(batch))
        self.losses.append(loss.detach().float())
        self.manual_backward(loss)  # the fault: no opt.zero_grad() anywhere
        opt.step()
        sched.step()
        return loss

    def configure_optimizers(self) -> Any:
        if self.exclude is None:
            return super().configure_optimizers()
        kept = nn.ParameterList(
            [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(self.exclude)]
        )
        holder = nn.Module()
        holder.params = kept
        return self.recipe.configure(holder, self.trainer.max_steps)


def task(net: nn.Module, loss_fn: Callable, train: Any, recipe: Recipe, batch_size: int, **kw: Any) -> SweepTask:
    return SweepTask(net, loss_fn, train, train, recipe, batch_size, **kw)


# -- losses ------------------------------------------------------------------------------------------------------
def hf_image_classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(pixel_values=batch[0], labels=batch[1]).loss


def hf_vit_detached(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    hidden = net.vit(pixel_values=batch[0]).last_hidden_state.detach()  # the fault
    return F.cross_entropy(net.classifier(hidden[:, 0]), batch[1])


def hf_masked_lm(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    tokens = batch[0]
    chosen = torch.rand(tokens.shape) < 0.15
    chosen[:, 0] |= ~chosen.any(dim=1)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return net(input_ids=torch.where(chosen, torch.full_like(tokens, VOCAB), tokens), labels=labels).loss


def hf_token_classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[0], labels=batch[1]).loss


def hf_seq2seq(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[0], labels=batch[0].flip(1)).loss  # reverse the sequence


def hf_audio_classify(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_values=batch[0], labels=batch[1]).loss


def hf_clip(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return net(input_ids=batch[1], pixel_values=batch[0], return_loss=True).loss


# -- data --------------------------------------------------------------------------------------------------------
def images(n: int = 1024, size: int = 32, shuffled: bool = False) -> TensorDataset:
    x, y = data.class_images(n, seed=1, size=size).tensors
    if shuffled:
        y = y[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    return TensorDataset(x, y)


def tokens(n: int = 2048, seq_len: int = SEQ) -> TensorDataset:
    return data.markov_tokens(n, seed=1, seq_len=seq_len)


def token_labels(n: int = 2048) -> TensorDataset:
    (t,) = tokens(n).tensors
    labels = torch.zeros_like(t)
    labels[:, 1:] = t[:, :-1] % 3  # a tag set by the previous token
    return TensorDataset(t, labels)


def bag(n: int = 2048, shuffled: bool = False) -> TensorDataset:
    t, mask, y = data.bag_of_words(n, seed=1).tensors
    if shuffled:
        y = y[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    return TensorDataset(t, mask, y)


def audio(n: int = 512, length: int = 1600, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(classes, (n,), generator=g)
    time_axis = torch.arange(length) / 16000
    phase = 6.28 * torch.rand(n, 1, generator=g)
    x = torch.sin(6.28 * (200.0 * (1 + y[:, None])) * time_axis + phase) + 0.5 * torch.randn(n, length, generator=g)
    return TensorDataset(x, y)


def image_text(n: int = 1024) -> TensorDataset:
    x, y = images(n).tensors
    g = torch.Generator().manual_seed(2)
    t = 3 + 5 * y[:, None] + torch.randint(5, (n, 8), generator=g)
    t[:, -1] = 2  # the end-of-text token CLIP pools at
    return TensorDataset(x, t)


# -- hand-built nets ---------------------------------------------------------------------------------------------
def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, classes: int = 3, w: int = 16, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach
        self.enc1, self.enc2 = nn.Sequential(conv_bn(3, w), conv_bn(w, w)), nn.Sequential(conv_bn(w, 2 * w))
        self.mid = nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w))
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), conv_bn(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, 2), conv_bn(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        if self.detach:  # the fault: the encoder's output cut off
            m, e1, e2 = m.detach(), e1.detach(), e2.detach()
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        return {"out": self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))}


class NormedCNN(nn.Module):
    """A small CNN with weight-normalised convolutions (or spectral-normalised linears)."""

    def __init__(self, kind: str = "weight") -> None:
        super().__init__()
        wrap = torch.nn.utils.parametrizations.weight_norm if kind == "weight" else lambda m: m
        lin = torch.nn.utils.parametrizations.spectral_norm if kind == "spectral" else lambda m: m
        self.features = nn.Sequential(
            wrap(nn.Conv2d(3, 32, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2),
            wrap(nn.Conv2d(32, 64, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2),
            wrap(nn.Conv2d(64, 64, 3, padding=1)), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(lin(nn.Linear(64, 64)), nn.ReLU(), lin(nn.Linear(64, 10)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TiedLSTM(nn.Module):
    """word_language_model with ``--tied``: the decoder shares the embedding's weight."""

    def __init__(self, vocab: int = VOCAB, d: int = 128) -> None:
        super().__init__()
        self.embed, self.drop = nn.Embedding(vocab, d), nn.Dropout(0.2)
        self.lstm = nn.LSTM(d, d, num_layers=2, dropout=0.2, batch_first=True)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.decoder(self.drop(self.lstm(self.drop(self.embed(t)))[0]))


# -- builders ----------------------------------------------------------------------------------------------------
def roberta(shuffled: bool = False) -> SweepTask:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=VOCAB + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        pad_token_id=VOCAB, max_position_embeddings=VOCAB + SEQ + 2, num_labels=2,
    )  # fmt: skip
    return task(RobertaForSequenceClassification(cfg), hf_classify, bag(shuffled=shuffled), ADAMW_TF, 32)


def _bert_config(**kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=SEQ, **kw,
    )  # fmt: skip


def bert_mlm() -> SweepTask:
    from transformers import BertForMaskedLM

    return task(BertForMaskedLM(_bert_config()), hf_masked_lm, tokens(), ADAMW_TF, 32)


def bert_token(exclude: str | None = None) -> SweepTask:
    from transformers import BertForTokenClassification

    net = BertForTokenClassification(_bert_config(num_labels=3))
    net.bert.pooler = __import__("transformers").models.bert.modeling_bert.BertPooler(net.config)  # built, unused
    return task(net, hf_token_classify, token_labels(), Recipe("adamw", lr=1e-3, weight_decay=0.01,
                schedule="warmup_linear", warmup=0.1), 32, exclude=exclude)  # fmt: skip


def t5() -> SweepTask:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    recipe = Recipe("adamw", lr=1e-3, weight_decay=0.01, schedule="warmup_linear", warmup=0.1)
    return task(T5ForConditionalGeneration(cfg), hf_seq2seq, tokens(seq_len=16), recipe, 32)


def llama(lr: float = 1e-3, no_zero_grad: bool = False) -> SweepTask:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    recipe = Recipe("adamw", lr=lr, weight_decay=0.1, betas=(0.9, 0.95), schedule="warmup_cosine", warmup=0.1)
    return task(LlamaForCausalLM(cfg), hf_language_model, tokens(), recipe, 16, no_zero_grad=no_zero_grad)


def vit_hf(exclude: str | None = None, detach: bool = False) -> SweepTask:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )  # fmt: skip
    loss = hf_vit_detached if detach else hf_image_classify
    return task(ViTForImageClassification(cfg), loss, images(), ADAMW_VIS, 16, exclude=exclude)


def wav2vec2() -> SweepTask:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=4, classifier_proj_size=32,
    )  # fmt: skip
    return task(Wav2Vec2ForSequenceClassification(cfg), hf_audio_classify, audio(), ADAMW_TF, 16)


def clip() -> SweepTask:
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    cfg = CLIPConfig(
        text_config={**tower, "vocab_size": VOCAB, "max_position_embeddings": 8, "eos_token_id": 2},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    recipe = Recipe("adamw", lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, schedule="warmup_cosine",
                    warmup=0.1)  # fmt: skip
    return task(CLIPModel(cfg), hf_clip, image_text(), recipe, 32)


def timm_model(name: str, recipe: Recipe = ADAMW_VIS, **kw: Any) -> Callable[[], SweepTask]:
    def build() -> SweepTask:
        import timm

        return task(timm.create_model(name, num_classes=10, **kw), classify, images(), recipe, 16)

    return build


def mixer() -> SweepTask:
    from timm.models.mlp_mixer import MlpMixer

    net = MlpMixer(num_classes=10, img_size=32, patch_size=4, num_blocks=4, embed_dim=64)
    return task(net, classify, images(), ADAMW_VIS, 16)


def densenet(lr: float = 0.1 * 16 / 64, shuffled: bool = False, no_zero_grad: bool = False) -> SweepTask:
    import torchvision

    net = torchvision.models.DenseNet(growth_rate=12, block_config=(2, 2, 2), num_init_features=24, num_classes=10)
    recipe = Recipe("sgd", lr=lr, weight_decay=1e-4, nesterov=True, schedule="cosine")
    return task(net, classify, images(shuffled=shuffled), recipe, 16, no_zero_grad=no_zero_grad)


def deeplab_resnet18() -> SweepTask:
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    backbone = IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"})
    net = DeepLabV3(backbone, DeepLabHead(512, 3))
    recipe = Recipe("sgd", lr=0.02 * 8 / 32, weight_decay=1e-4, schedule="poly")
    return task(net, segment, data.segmentation_images(256, seed=1), recipe, 8)


def unet(detach: bool = False) -> SweepTask:
    recipe = Recipe("adam", lr=1e-3)
    return task(UNet(detach=detach), segment, data.segmentation_images(256, seed=1), recipe, 8)


def frozen_resnet18() -> SweepTask:
    import torchvision

    net = torchvision.models.resnet18()
    net.requires_grad_(False)  # a "pretrained" backbone, frozen on purpose; only the new head learns
    net.fc = nn.Linear(512, 10)
    return task(net, classify, images(), Recipe("adamw", lr=1e-3, weight_decay=0.01), 16)


def normed_cnn(kind: str) -> Callable[[], SweepTask]:
    return lambda: task(NormedCNN(kind), classify, images(), Recipe("adam", lr=1e-3), 16)


def tied_lstm() -> SweepTask:
    return task(TiedLSTM(), next_token, tokens(), Recipe("sgd", lr=20.0, momentum=0.0), 32)


def gpt2_accumulate() -> SweepTask:
    t = gpt2()
    return task(t.net, t.loss_fn, t.train_set, t.recipe, 16)


@dataclass
class Case:
    build: Callable[[], pl.LightningModule]
    steps: int = 150
    trainer: dict[str, Any] = field(default_factory=dict)
    fault: str = ""  # what the user did wrong, and what gradwatch should say


CLIP_025 = {"gradient_clip_val": 0.25}
CASES: dict[str, Case] = {
    # healthy
    "roberta_cls": Case(roberta),
    "bert_mlm": Case(bert_mlm),
    "bert_token_cls": Case(bert_token),
    "t5_tiny": Case(t5),
    "llama_tiny": Case(llama),
    "vit_hf": Case(vit_hf),
    "wav2vec2_cls": Case(wav2vec2, steps=120),
    "clip_tiny": Case(clip),
    "swin_tiny": Case(
        timm_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            patch_size=2,
            window_size=4,
            embed_dim=32,
            depths=(2, 2),
            num_heads=(2, 4),
        )
    ),  # fmt: skip
    "efficientnet_b0": Case(
        timm_model(
            "efficientnet_b0",
            Recipe("rmsproptf", lr=0.048 * 16 / 384, weight_decay=1e-5, eps=1e-3, schedule="warmup_cosine", warmup=0.1),
        ),
        steps=100,
    ),  # fmt: skip
    "regnetx_002": Case(
        timm_model("regnetx_002", Recipe("sgd", lr=0.1 * 16 / 128, weight_decay=5e-5, schedule="cosine"))
    ),  # fmt: skip
    "mlp_mixer": Case(mixer),
    "densenet_small": Case(densenet),
    "deeplab_resnet18": Case(deeplab_resnet18, steps=100),
    "unet_bn": Case(unet, steps=120),
    "gpt2_accumulate4": Case(gpt2_accumulate, steps=60, trainer={"accumulate_grad_batches": 4}),
    "llama_bf16_mixed": Case(llama, trainer={"precision": "bf16-mixed"}),
    "resnet18_frozen_backbone": Case(frozen_resnet18),
    "cnn_weight_norm": Case(normed_cnn("weight")),
    "mlp_spectral_norm": Case(normed_cnn("spectral")),
    "cnn_plain_control": Case(normed_cnn("none")),  # NormedCNN without any norm
    "lstm_tied_embeddings": Case(tied_lstm, trainer=CLIP_025),
    # faults
    "FAULT_llama_lr100": Case(lambda: llama(lr=0.1), fault="learning_rate"),
    "FAULT_densenet_lr100": Case(lambda: densenet(lr=2.5), fault="learning_rate"),
    "FAULT_bert_token_head_not_in_optimizer": Case(
        lambda: bert_token(exclude="net.classifier"), fault="not_in_optimizer"
    ),  # fmt: skip
    "FAULT_vit_hf_head_not_in_optimizer": Case(lambda: vit_hf(exclude="net.classifier"), fault="not_in_optimizer"),
    "FAULT_vit_hf_detach_encoder": Case(lambda: vit_hf(detach=True), fault="no_gradient (warning)"),
    "FAULT_unet_detach_encoder": Case(lambda: unet(detach=True), steps=60, fault="no_gradient (warning)"),
    "FAULT_llama_no_zero_grad": Case(lambda: llama(no_zero_grad=True), fault="gradients_not_reset"),
    "FAULT_densenet_no_zero_grad": Case(lambda: densenet(no_zero_grad=True), fault="gradients_not_reset"),
    "FAULT_roberta_shuffled_labels": Case(lambda: roberta(shuffled=True), fault="nothing alarming"),
    "FAULT_densenet_shuffled_labels": Case(lambda: densenet(shuffled=True), fault="nothing alarming"),
    "FAULT_llama_fp16_true": Case(llama, trainer={"precision": "16-true"}, fault="gradient_underflow"),
    "FAULT_vit_hf_fp16_true": Case(vit_hf, trainer={"precision": "16-true"}, fault="gradient_underflow"),
}


def run(name: str, case: Case) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()
    module = case.build()
    watch = GradWatch()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            default_root_dir=root, accelerator="cpu", devices=1, max_steps=case.steps, log_every_n_steps=10,
            callbacks=[watch], logger=MemoryLogger(), enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, **case.trainer,
        )  # fmt: skip
        trainer.fit(module)
    losses = module.loss_curve()
    k = max(1, len(losses) // 10)
    return {
        "name": name,
        "steps": f"{trainer.global_step}/{case.steps}",
        "loss": f"{sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}",
        "alerts": watch.alerts,
        "seconds": time.perf_counter() - start,
        "fault": case.fault,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    parser.add_argument("--full", action="store_true", help="print whole alert messages")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    total, results = time.perf_counter(), []
    for name in args.cases:
        try:
            results.append(run(name, CASES[name]))
        except Exception as error:  # noqa: BLE001 - a case that cannot build or fit is reported and skipped
            traceback.print_exc()
            results.append({"name": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        r = results[-1]
        print(f"=== DONE {name}: {r.get('loss', r.get('error'))} ({r.get('seconds', 0):.0f}s)", flush=True)
    print("\n\n######## SUMMARY ########")
    for r in results:
        if "error" in r:
            print(f"\n[{r['name']}] ERROR {r['error']}")
            continue
        expected = f"  (fault; expected: {r['fault']})" if r["fault"] else ""
        print(f"\n[{r['name']}] steps {r['steps']}  loss {r['loss']}  {r['seconds']:.0f}s{expected}")
        for a in r["alerts"]:
            message = " ".join(a.message.split())[: None if args.full else 150]
            print(f"  step {a.step:>4} {a.kind:<20} {a.severity:<7} {a.name[:60]}: {message}")
        if not r["alerts"]:
            print("  (no alerts)")
    print(f"\ntotal wall time {time.perf_counter() - total:.0f}s")


if __name__ == "__main__":
    main()
