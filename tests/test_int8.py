"""Int8 layers (`lookalike.core.int8`) against the fp32 layers they replace."""

from __future__ import annotations

import pytest
import torch

from lookalike.core.int8 import Int8Linear, Int8SelfAttention, quantize


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_linear_is_close_to_the_fp32_layer_and_really_int8() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight_t.dtype == torch.int8
    x = torch.randn(5, 7, 64)
    with torch.inference_mode():
        out, ref = layer(x), linear(x)
    assert out.shape == ref.shape == (5, 7, 48)
    error = _relative_error(out, ref)
    assert 0 < error < 0.02  # another arithmetic, close to fp32


def test_int8_linear_scales_each_row_on_its_own() -> None:
    # Per-row activation scales: a row's output does not depend on the other rows (an image's
    # vector on its batch-mates), even when another row is 1000x larger.
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 16))
    small, large = torch.randn(1, 32), 1000 * torch.randn(1, 32)
    with torch.inference_mode():
        alone = layer(small)
        together = layer(torch.cat([small, large]))[:1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_int8_self_attention_matches_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(2)
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    layer = Int8SelfAttention(attention)
    x = torch.randn(3, 10, 64) if batch_first else torch.randn(10, 3, 64)
    with torch.inference_mode():
        out, weights = layer(x, x, x, need_weights=False)
        ref, _ = attention(x, x, x, need_weights=False)
    assert weights is None and out.shape == ref.shape
    assert 0 < _relative_error(out, ref) < 0.03
    # each sequence on its own gives the same result as within the batch
    one = x[:1] if batch_first else x[:, :1]
    with torch.inference_mode():
        alone, _ = layer(one, one, one, need_weights=False)
    first = out[:1] if batch_first else out[:, :1]
    torch.testing.assert_close(alone, first, rtol=1e-5, atol=1e-5)


def test_cross_attention_and_weights_go_to_the_original_module() -> None:
    torch.manual_seed(3)
    attention = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    layer = Int8SelfAttention(attention)
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    with torch.inference_mode():
        out, _ = layer(q, kv, kv, need_weights=False)
        ref, _ = attention(q, kv, kv, need_weights=False)
        _, weights = layer(q, q, q, need_weights=True)
    torch.testing.assert_close(out, ref)
    assert weights is not None and weights.shape == (2, 4, 4)


def test_quantize_replaces_a_copy_and_leaves_the_model_alone() -> None:
    block = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)
    )
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    holder.mlp = block
    quantized = quantize(holder)
    assert isinstance(quantized.attn, Int8SelfAttention)
    assert [type(m) for m in quantized.mlp] == [Int8Linear, torch.nn.GELU, Int8Linear]
    # the attention module kept for calls it passes on still has its fp32 out_proj
    assert type(quantized.attn.original.out_proj) is not Int8Linear
    assert isinstance(holder.attn, torch.nn.MultiheadAttention)
    assert all(type(m) is torch.nn.Linear for m in holder.mlp if not isinstance(m, torch.nn.GELU))


def test_attention_with_extra_key_value_rows_is_left_in_fp32() -> None:
    holder = torch.nn.Module()
    holder.biased = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True)
    holder.zeros = torch.nn.MultiheadAttention(16, 2, add_zero_attn=True)
    quantized = quantize(holder)
    assert type(quantized.biased) is torch.nn.MultiheadAttention
    assert type(quantized.zeros) is torch.nn.MultiheadAttention
