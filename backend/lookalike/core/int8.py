"""Int8 inference on the CPU: Linear layers (and self-attention projections) in 8-bit integers.

Contract: `quantize(module)` returns a copy of `module` in which every `nn.Linear` and every
plain `nn.MultiheadAttention` (packed q/k/v, no extra key/value rows) computes its projections
in int8 (`torch._int_mm`, oneDNN's VNNI kernels on x86), with

- weights quantized once, symmetrically, per output channel;
- activations quantized on the fly, symmetrically, per row, i.e. per token of each image, so a
  vector never depends on the other images of its batch (a file queried alone scores 1.0
  against its own indexed vector), and an outlier token does not coarsen the others' scale.

Measured on ViT-B-32 (bench/bench_embed.py): about 1.5x the throughput of PyTorch's dynamic
quantization applied per image (`quantize_dynamic` scales a whole batch at once, and leaves
`nn.MultiheadAttention`'s projections in fp32), with vectors closer to fp32 (cosine > 0.9999).
A module that reads a replaced layer's `weight` directly fails on its first forward pass;
callers probe and keep fp32 then (see `InferencePlan.prepare_model`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class Int8Linear(torch.nn.Module):
    """`y = x W^T + b` with W and each row of x in int8, accumulated in int32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", quantized.t().contiguous())  # (in, out) for _int_mm
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.out_features = weight.shape[0]

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        quantized = (rows / scale).round_().to(torch.int8)  # |rows / scale| <= 127 by design
        out = torch._int_mm(quantized, self.weight_t).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 (out, in), as this layer's products see it."""
        return self.weight_t.t().float() * self.weight_scale[:, None]


class Int8SelfAttention(torch.nn.Module):
    """`nn.MultiheadAttention` with int8 projections. Self-attention without a mask (what
    image towers run) takes the fast path: q, k, v in one int8 product and PyTorch's fused
    attention kernel. Any other call (cross-attention, masks, attention weights asked for)
    runs PyTorch's own attention function on the dequantized weights, so no fp32 copy of the
    projections is kept (~110 MB for ViT-B-32, ~400 MB for ViT-L-14)."""

    def __init__(self, attention: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, self.batch_first = attention.num_heads, attention.batch_first
        self.width = attention.embed_dim
        self.qkv = Int8Linear(attention.in_proj_weight, attention.in_proj_bias)
        self.proj = Int8Linear.from_linear(attention.out_proj)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        plain = key is query and value is query and attn_mask is None and query.dim() == 3
        if not plain or need_weights or kwargs:
            return self._general(query, key, value, need_weights, attn_mask, **kwargs)
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, width = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, tokens, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _general(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:  # PyTorch's function takes (tokens, batch, width)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.width, self.heads,
            self.qkv.dequantized(), self.qkv.bias, None, None, False, 0.0,
            self.proj.dequantized(), self.proj.bias,
            training=False, need_weights=need_weights, attn_mask=attn_mask, **kwargs,
        )  # fmt: skip
        return (out.transpose(0, 1) if batched_first else out), weights


def quantize(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its Linear and self-attention layers in int8 (see the module
    docstring); `module` itself is left as it was."""
    quantized = copy.deepcopy(module)
    attentions = [m for m in quantized.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    # Never inside an attention module: one kept in fp32 reads its out_proj's weight itself.
    inside = {id(m) for a in attentions for m in a.modules()}
    for parent in [m for m in quantized.modules() if id(m) not in inside]:
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention):
                if _plain_attention(child):
                    setattr(parent, name, Int8SelfAttention(child))
            elif isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    return quantized


def _plain_attention(attention: torch.nn.MultiheadAttention) -> bool:
    """Attention that `Int8SelfAttention` computes exactly as PyTorch does: one packed q/k/v
    projection, no extra key/value bias rows, no zero-attention row."""
    return (
        attention._qkv_same_embed_dim
        and attention.in_proj_weight is not None
        and attention.bias_k is None
        and not attention.add_zero_attn
    )
