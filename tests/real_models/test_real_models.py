"""GradWatch() at its defaults stays silent on real architectures trained with their usual recipes.

Each test is a real ``Trainer.fit`` on CPU of a model from torchvision, timm or Hugging Face transformers (or a
classic PyTorch net), small enough for seconds, long enough for every detector to act: the gradient norms are
logged every 10 steps and the activation windows (10 sampled batches, one every 10 steps) close at least twice.
A healthy run that trains must raise no alert of severity ``"warning"``. The models live in
``tests/real_models/models.py``; ``benchmarks/calibrate_real_models.py`` measures the same runs in detail.

Needs the ``real`` extra (``pip install -e ".[real]"``); without it these tests are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_gradwatch import GradWatch
from tests.real_models.models import CASES, CASES_BY_NAME, Case, FitResult, HandWrittenGPT, fit


def _skip_without(case: Case) -> None:
    for library in case.requires:
        pytest.importorskip(library, reason=f"{library} is not installed (pip install -e '.[real]')")


def _decile_means(losses: list[float]) -> tuple[float, float]:
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _assert_detectors_ran(case: Case, result: FitResult) -> None:
    logged_norms = [s for k, s in result.logger.history.items() if k.startswith("gradwatch/global/grad_norm")]
    assert logged_norms and min(len(s) for s in logged_norms) >= 10, "the gradient norms were not logged"
    assert result.logger.matching("gradwatch/clip/"), "AdaptiveClipping logged nothing"
    for metric in case.watched:
        series = result.logger.matching(f"gradwatch/{metric}/")
        checks = {step for values in series.values() for step, _ in values}
        assert len(checks) >= 2, f"{metric}: {len(checks)} activation checks ran, expected at least 2"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_gradwatch_stays_silent_on_a_healthy_real_model(case: Case, tmp_path: Path) -> None:
    _skip_without(case)
    gradwatch = GradWatch()
    result = fit(case, tmp_path, [gradwatch])

    assert result.task.trainer.global_step == case.max_steps, f"halted at step {result.task.trainer.global_step}"
    _assert_detectors_ran(case, result)
    if case.name == "gan":  # adversarial losses do not fall; the samples must move onto the data's modes
        assert result.quality_after < 0.7 * result.quality_before, (result.quality_before, result.quality_after)
    else:
        first, last = _decile_means(result.losses)
        assert last < 0.8 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    warnings = [alert for alert in gradwatch.alerts if alert.severity == "warning"]
    assert warnings == [], "\n".join(alert.message for alert in warnings)


def test_gradwatch_lets_the_gpt_minus_inf_causal_mask_buffer_be(tmp_path: Path) -> None:
    """A hand-written GPT keeps its causal mask as a buffer of ``-inf`` (``generate_square_subsequent_mask``), the
    usual way: a non-finite buffer by design, not a fault. GradWatch() must neither halt nor warn."""
    mask = HandWrittenGPT().h[0].attn.mask
    assert torch.isneginf(mask).sum() == mask.shape[0] * (mask.shape[0] - 1) // 2  # the strict upper triangle
    case = CASES_BY_NAME["gpt_handwritten"]
    gradwatch = GradWatch()
    result = fit(case, tmp_path, [gradwatch])
    halts = [alert for alert in gradwatch.alerts if alert.kind == "non_finite"]
    assert result.task.trainer.global_step == case.max_steps, "\n".join(alert.message for alert in halts)
    assert [alert for alert in gradwatch.alerts if alert.severity == "warning"] == []
    assert torch.isneginf(result.task.net.h[0].attn.mask).any()  # the buffer was left as it was


@pytest.mark.parametrize("name", ["lstm_lm_clipped", "gru_classifier"])
def test_gradients_through_time_stays_silent_on_healthy_recurrent_models(name: str, tmp_path: Path) -> None:
    """The recurrent real models (a word-language-model LSTM, a GRU classifier leaving its plateau), probed every 25
    steps next to the preset: their horizons are measured, and nothing is alerted."""
    from lightning_gradwatch import GradientsThroughTime

    case = CASES_BY_NAME[name]
    watch = GradientsThroughTime(every_n_steps=25)
    result = fit(case, tmp_path, [GradWatch(), watch])
    assert result.task.trainer.global_step == case.max_steps
    assert watch.state.readings, "no recurrent module was probed"
    assert [a for a in watch.alerts if a.severity == "warning"] == [], [a.message for a in watch.alerts]


def test_a_48_layer_gpt2_is_charted_within_the_budget_and_stays_silent(tmp_path: Path) -> None:
    """GPT-2 with 48 blocks has 291 layers with parameters: charted as 51 series per metric (the 48 blocks, the
    token and position embeddings, the final LayerNorm), at most 64; no warning."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[real]')")
    from tests.real_models.models import gpt2

    case = Case("gpt2_48", lambda: gpt2(n_layer=48, n_embd=32), ("transformers",), max_steps=20)
    gradwatch = GradWatch(activations=False)
    result = fit(case, tmp_path, [gradwatch], log_every_n_steps=5)
    for family in ("grad_norm", "grad_to_weight", "update_to_weight", "zero_fraction"):
        names = {k.split("/", 2)[2] for k in result.logger.history if k.startswith(f"gradwatch/{family}/")}
        assert 0 < len(names) <= 64, (family, len(names))
    names = {k.split("/", 2)[2] for k in result.logger.history if k.startswith("gradwatch/grad_norm/")}
    assert len(names) == 51 and "net.transformer.h.47" in names
    assert [a for a in gradwatch.alerts if a.severity == "warning"] == []


@pytest.mark.parametrize("name", ["resnet18", "bert_classifier"])
def test_gradwatch_under_torch_compile_watches_activations_stays_silent_and_never_recompiles(
    name: str, tmp_path: Path
) -> None:
    """The network compiled (dynamo; the eager backend keeps CPU compile time out of the test): the activation
    checks run on their eager pass (ResNet's BatchNorm: from step 50) and stay silent like the uncompiled run, and
    no graph is added after the first steps (a hook or mode reaching the graph would recompile on every sample)."""
    from lightning.pytorch.callbacks import Callback
    from torch._dynamo.utils import counters

    class GraphCount(Callback):
        at: dict[int, int] = {}

        def on_train_batch_end(self, trainer: object, *args: object) -> None:
            self.at[trainer.global_step] = int(counters["stats"]["unique_graphs"])  # type: ignore[attr-defined]

    case = CASES_BY_NAME[name]
    _skip_without(case)
    built = case.build

    def compiled() -> object:
        task = built()
        task.net = torch.compile(task.net, backend="eager")
        return task

    torch._dynamo.reset()
    counters.clear()
    gradwatch, graphs = GradWatch(forward_fn=lambda module, batch: module.net(batch[0])), GraphCount()
    result = fit(
        Case(name, compiled, case.requires, case.max_steps, case.trainer, case.watched), tmp_path, [gradwatch, graphs]
    )
    assert result.task.trainer.global_step == case.max_steps
    _assert_detectors_ran(case, result)
    assert not [a for a in gradwatch.alerts if a.severity == "warning"], [a.message for a in gradwatch.alerts]
    assert graphs.at[case.max_steps] == graphs.at[2] >= 1, graphs.at
