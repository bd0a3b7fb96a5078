"""The clipping math without a Trainer."""

import math

import pytest
import torch

from lightning_gradwatch.functional import (
    agc_coefficients,
    apply_clip_coefficient,
    clip_coefficient,
    ema_update,
    global_norm,
    ring_push,
    ring_quantile,
    zscore_threshold,
)


def _state() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(()), torch.zeros(()), torch.zeros(())


def test_ema_starts_as_plain_average_then_decays() -> None:
    mean, var, count = _state()
    values = [2.0, 4.0, 9.0]
    for v in values:
        mean, var, count = ema_update(mean, var, count, torch.tensor(v), 0.9, torch.tensor(True))
    ref = torch.tensor(values)
    assert mean.item() == pytest.approx(ref.mean().item())
    assert var.item() == pytest.approx(ref.var(unbiased=False).item())
    assert count.item() == 3
    # after 1 / (1 - decay) values the weight of a new value is 1 - decay
    for _ in range(20):
        mean, var, count = ema_update(mean, var, count, torch.tensor(5.0), 0.9, torch.tensor(True))
    before = mean.item()
    mean, var, count = ema_update(mean, var, count, torch.tensor(15.0), 0.9, torch.tensor(True))
    assert mean.item() == pytest.approx(before + 0.1 * (15.0 - before))


@pytest.mark.parametrize("bad", [math.inf, math.nan, 1e30])
def test_ema_ignores_invalid_values(bad: float) -> None:
    mean, var, count = torch.tensor(1.0), torch.tensor(0.25), torch.tensor(30.0)
    m, v, c = ema_update(mean, var, count, torch.tensor(bad), 0.97, torch.tensor(False))
    assert (m.item(), v.item(), c.item()) == (1.0, 0.25, 30.0)


def test_clip_coefficient() -> None:
    norm, threshold = torch.tensor([0.5, 2.0, math.inf, math.nan, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, math.inf])
    coef = clip_coefficient(norm, threshold)
    assert coef[0].item() == 1.0
    assert coef[1].item() == pytest.approx(0.5, rel=1e-5)
    assert coef[2:].tolist() == [1.0, 1.0, 1.0]  # non-finite norms and unknown thresholds leave grads alone


def test_zscore_threshold_warmup_and_reciprocal_scaling() -> None:
    mean, var = torch.tensor(2.0), torch.tensor(0.25)  # std 0.5
    # nothing known: no clipping; in warm-up: the safety cap; after: mean + z * std
    assert zscore_threshold(mean, var, torch.tensor(0.0), 3.0, 10, 10.0).item() == math.inf
    assert zscore_threshold(mean, var, torch.tensor(5.0), 3.0, 10, 10.0).item() == 20.0
    assert zscore_threshold(mean, var, torch.tensor(5.0), 3.0, 10, None).item() == math.inf
    assert zscore_threshold(mean, var, torch.tensor(10.0), 3.0, 10, 10.0).item() == pytest.approx(3.5)
    # with the norm: below the ceiling nothing changes; a far outlier is brought close to the mean
    count = torch.tensor(10.0)
    assert zscore_threshold(mean, var, count, 3.0, 10, 10.0, norm=torch.tensor(2.1)).item() == pytest.approx(3.5)
    mild = zscore_threshold(mean, var, count, 3.0, 10, 10.0, norm=torch.tensor(5.0)).item()  # z = 6
    assert mild == pytest.approx(2.0 + 1.5 * 0.5)
    far = zscore_threshold(mean, var, count, 3.0, 10, 10.0, norm=torch.tensor(2000.0)).item()
    assert 2.0 < far < 2.01


def test_ring_buffer_quantile_matches_torch_and_wraps() -> None:
    buffer, count = torch.zeros(8), torch.zeros((), dtype=torch.int64)
    assert ring_quantile(buffer, count, 0.9).item() == math.inf
    values = [5.0, 1.0, 7.0]
    for v in values:
        buffer, count = ring_push(buffer, count, torch.tensor(v), torch.tensor(True))
    assert ring_quantile(buffer, count, 0.5).item() == pytest.approx(5.0)
    assert ring_quantile(buffer, count, 0.9).item() == pytest.approx(torch.quantile(torch.tensor(values), 0.9).item())
    buffer, count = ring_push(buffer, count, torch.tensor(math.inf), torch.tensor(False))  # skipped
    assert count.item() == 3
    stream = torch.rand(20) * 10
    for v in stream:
        buffer, count = ring_push(buffer, count, v, torch.tensor(True))
    window = stream[-8:]  # only the last 8 remain
    for q in (0.1, 0.5, 0.9, 1.0):
        assert ring_quantile(buffer, count, q).item() == pytest.approx(torch.quantile(window, q).item(), rel=1e-5)
    one, c1 = ring_push(torch.zeros(4), torch.zeros((), dtype=torch.int64), torch.tensor(3.0), torch.tensor(True))
    assert ring_quantile(one, c1, 0.9).item() == 3.0


def test_agc_clips_units_relative_to_their_weights() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # unit norms 5 and 0 (floored at eps)
    g = torch.tensor([[30.0, 40.0], [0.003, 0.004]])  # unit norms 50 and 0.005
    coefficients, max_ratio = agc_coefficients([w], [g], clip_factor=0.1, eps=1e-2)
    c = coefficients[0]
    assert c.shape == (2, 1)
    assert c[0].item() == pytest.approx(0.5 / 50, rel=1e-4)  # 0.1 * 5 = 0.5 allowed
    assert c[1].item() == pytest.approx(1e-3 / 0.005, rel=1e-4)  # 0.1 * max(0, 1e-2) = 1e-3 allowed
    assert max_ratio.item() == pytest.approx(100.0, rel=1e-4)
    # still-scaled gradients (fused optimizer under fp16): same coefficients once unscaled
    scaled, _ = agc_coefficients([w], [g * 1024], 0.1, 1e-2, grad_scale=torch.tensor(1 / 1024))
    assert torch.allclose(scaled[0], c)
    conv = agc_coefficients([torch.ones(4, 3, 2, 2)], [torch.ones(4, 3, 2, 2)], 0.5)[0][0]
    assert conv.shape == (4, 1, 1, 1)


def test_apply_clip_coefficient_mixed_dtypes() -> None:
    grads = [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
    norm = global_norm(grads)
    assert norm.item() == pytest.approx(3.0)
    coef = clip_coefficient(norm, torch.tensor(1.5))
    apply_clip_coefficient(grads, coef)
    assert global_norm(grads).item() == pytest.approx(1.5, rel=1e-2)
    assert [g.dtype for g in grads] == [torch.float32, torch.float64, torch.bfloat16]


SPECIAL = [0.0, 1e-30, 0.5, 1.0, 3.0, 1e30, math.inf, math.nan]


def _same(host: float, device: torch.Tensor) -> bool:
    expected = device.item()
    return (math.isnan(host) and math.isnan(expected)) or host == pytest.approx(expected, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("norm", SPECIAL)
@pytest.mark.parametrize("threshold", SPECIAL)
def test_clip_coefficient_on_floats_matches_tensors(norm: float, threshold: float) -> None:
    host = clip_coefficient(norm, threshold)
    assert isinstance(host, float) and _same(host, clip_coefficient(torch.tensor(norm), torch.tensor(threshold)))


@pytest.mark.parametrize("value", [v for v in SPECIAL if v != 1e30] + [1e15])  # float32 squares overflow at 1e19
@pytest.mark.parametrize("count", [0.0, 1.0, 5.0, 100.0])
@pytest.mark.parametrize("valid", [True, False])
def test_ema_and_zscore_threshold_on_floats_match_tensors(value: float, count: float, valid: bool) -> None:
    mean, var = 2.0, 0.25
    host = ema_update(mean, var, count, value, 0.9, valid)
    device = ema_update(torch.tensor(mean), torch.tensor(var), torch.tensor(count), torch.tensor(value), 0.9,
                        torch.tensor(valid))  # fmt: skip
    assert all(isinstance(h, float) and _same(h, d) for h, d in zip(host, device, strict=True))
    for cap in (None, 10.0):
        for norm in (None, value):
            h = zscore_threshold(mean, var, count, 3.0, 5, cap, norm=norm)
            d = zscore_threshold(torch.tensor(mean), torch.tensor(var), torch.tensor(count), 3.0, 5, cap,
                                 norm=None if norm is None else torch.tensor(norm))  # fmt: skip
            assert _same(h, d), (cap, norm)  # type: ignore[arg-type]
