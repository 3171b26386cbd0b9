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


@pytest.mark.parametrize("batch_first", [True, False])
def test_other_attention_calls_run_on_the_dequantized_weights(batch_first: bool) -> None:
    # Cross-attention, masks and attention weights: PyTorch's own attention function, on the
    # int8 weights dequantized (no fp32 copy is kept), so close to the original module.
    torch.manual_seed(3)
    attention = torch.nn.MultiheadAttention(32, 2, batch_first=batch_first).eval()
    layer = Int8SelfAttention(attention)
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, -1] = True  # nobody attends to the last token
    with torch.inference_mode():
        cross, _ = layer(q, kv, kv, need_weights=False)
        cross_ref, _ = attention(q, kv, kv, need_weights=False)
        masked, weights = layer(q, q, q, need_weights=True, attn_mask=mask)
        masked_ref, weights_ref = attention(q, q, q, need_weights=True, attn_mask=mask)
    assert cross.shape == cross_ref.shape and 0 < _relative_error(cross, cross_ref) < 0.03
    assert masked.shape == masked_ref.shape and _relative_error(masked, masked_ref) < 0.03
    assert weights.shape == weights_ref.shape == (2, 4, 4)
    assert float(weights[..., -1].abs().max()) == 0.0  # the mask held
    torch.testing.assert_close(weights, weights_ref, atol=0.02, rtol=0)


def test_int8_attention_keeps_no_fp32_copy_of_its_projections() -> None:
    attention = torch.nn.MultiheadAttention(64, 4)
    layer = Int8SelfAttention(attention)
    fp32 = sum(t.numel() for t in layer.state_dict().values() if t.dtype == torch.float32)
    assert fp32 == 3 * 64 + 64 + 3 * 64 + 64  # scales and biases only
    assert not [m for m in layer.modules() if isinstance(m, torch.nn.MultiheadAttention)]


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
    assert isinstance(holder.attn, torch.nn.MultiheadAttention)
    assert all(type(m) is torch.nn.Linear for m in holder.mlp if not isinstance(m, torch.nn.GELU))


def test_attention_with_extra_key_value_rows_is_left_in_fp32() -> None:
    holder = torch.nn.Module()
    holder.biased = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True)
    holder.zeros = torch.nn.MultiheadAttention(16, 2, add_zero_attn=True)
    quantized = quantize(holder)
    assert type(quantized.biased) is torch.nn.MultiheadAttention
    assert type(quantized.biased.out_proj) is not Int8Linear  # it reads out_proj.weight itself
    assert type(quantized.zeros) is torch.nn.MultiheadAttention
