"""Int8 inference on the CPU: Linear layers (and self-attention projections) in 8-bit integers.

Contract: `quantize(module)` returns a copy of `module` in which every `nn.Linear` and every
self-attention `nn.MultiheadAttention` computes its matrix products in int8 (`torch._int_mm`,
oneDNN's VNNI kernels on x86), with

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


class Int8SelfAttention(torch.nn.Module):
    """`nn.MultiheadAttention` for self-attention with int8 projections (q, k, v in one
    product) and PyTorch's fused attention kernel. Calls it cannot serve the same way
    (cross-attention, attention weights asked for) go to the original module."""

    def __init__(self, attention: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.original = attention
        self.heads, self.batch_first = attention.num_heads, attention.batch_first
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
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or need_weights or kwargs or query.dim() != 3:
            return self.original(
                query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs
            )
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, width = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, tokens, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def quantize(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its Linear and self-attention layers in int8 (see the module
    docstring); `module` itself is left as it was."""
    quantized = copy.deepcopy(module)
    attentions = [m for m in quantized.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    # An attention module's own out_proj stays as it is: the original module serves the calls
    # Int8SelfAttention passes on.
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
