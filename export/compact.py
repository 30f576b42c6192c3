"""A physically slim nn.Module built from (dense timm model, plan).

Pruned linears become smaller nn.Linear layers, channel and token selections become constant
index_select (Gather in ONNX), static attention and token aggregation become constant matrices.
timm's own VisionTransformer forward is kept: only `blocks` is replaced, and the blocks reuse
timm's norms, layer scales and Mlp (with smaller Linears).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from vitslim.pruning.plan import BlockPlan, SlimPlan, validate
from vitslim.pruning.reference import aggregate_tokens
from vitslim.pruning.timm_adapter import (
    BlockParts,
    ViTGeometry,
    block_parts,
    blocks_of,
    replace_blocks,
    supported_geometry,
)

from .errors import ExportError
from .token_layout import TOKEN_LAYOUTS, is_prefix, slice_layout


class TakePrefix(nn.Module):
    """x.narrow(dim, 0, count): a Slice in ONNX."""

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.count, self.dim = count, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.narrow(self.dim, 0, self.count)


def token_selector(kept: Optional[tuple[int, ...]]) -> nn.Module:
    """Identity (all tokens), a Slice (a prefix) or a constant-index Gather over the token axis."""
    if kept is None:
        return nn.Identity()
    return TakePrefix(len(kept), dim=1) if is_prefix(kept) else SelectIndices(kept, dim=1)


class SelectIndices(nn.Module):
    """x.index_select(dim, constant indices): a constant-index Gather in ONNX."""

    def __init__(self, indices: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("kept_indices", torch.tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.kept_indices)


def slice_linear(
    linear: nn.Linear, in_indices: Optional[list[int]] = None, out_indices: Optional[list[int]] = None
) -> nn.Linear:
    """A new Linear with only the given input columns and output rows of `linear` (None keeps all)."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if out_indices is not None:
        weight = weight[out_indices]
        bias = None if bias is None else bias[out_indices]
    if in_indices is not None:
        weight = weight[:, in_indices]
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced


# How a block reads a subset of its LayerNorm's output channels (qkv_in, fc1_in):
# "gather": a constant-index Gather, then Linears with only the kept columns (the smallest graph,
#   the fewest MACs);
# "masked": no Gather; full-width Linears whose other columns are zero (more MACs, but no strided
#   copy of the activations: faster on an H100 at batch 64 and 256, docs/plan-and-export.md).
CHANNEL_LAYOUTS = ("gather", "masked")


def channel_selector(kept: Optional[tuple[int, ...]], channel_layout: str) -> nn.Module:
    """The module that picks the kept input channels: a Gather, or nothing (masked layout / all kept)."""
    return SelectIndices(kept, dim=-1) if kept is not None and channel_layout == "gather" else nn.Identity()


def reading_linear(
    linear: nn.Linear, kept: Optional[tuple[int, ...]], out_rows: Optional[list[int]], channel_layout: str
) -> nn.Linear:
    """`linear` reading only the `kept` input channels, with the given output rows (see CHANNEL_LAYOUTS)."""
    if kept is None or channel_layout == "gather":
        return slice_linear(linear, None if kept is None else list(kept), out_rows)
    sliced = slice_linear(linear, None, out_rows)
    dropped = torch.ones(sliced.in_features, dtype=torch.bool)
    dropped[list(kept)] = False
    with torch.no_grad():
        sliced.weight[:, dropped] = 0
    return sliced


def _constant(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().to(device=like.device, dtype=like.dtype).clone(), requires_grad=False)


class CompactAttention(nn.Module):
    """Rectangular multi-head attention: queries for the kept tokens only, keys/values for all.

    Input [B, N_in, C] (LayerNorm-1 output); output [B, N_out, dim]. Dynamic attention runs
    through `scaled_dot_product_attention` (fused kernels on GPUs, MatMul -> Softmax -> MatMul in
    ONNX), with value heads that may be narrower than query heads (VTP). One GEMM makes q, k and v
    when all read the same tokens; with cut queries, q is made for the kept tokens and k, v in one
    GEMM for all. With a static matrix [H, N_out, N_in] the q/k projections, the scores and the
    softmax are gone and attention is one batched matmul.

    `pad_value_heads`: narrower value heads are zero-padded to the query head width for the
    attention and the padding sliced off its output (exact: zero value channels attend to zero),
    for runtimes whose fused attention needs keys and values of one shape (export/attention_form.py).
    """

    def __init__(
        self,
        parts: BlockParts,
        plan: BlockPlan,
        geometry: ViTGeometry,
        channel_layout: str = "gather",
        pad_value_heads: bool = False,
    ) -> None:
        super().__init__()
        heads, head_dim, attn_dim = geometry.num_heads, geometry.head_dim, geometry.attn_dim
        value_channels = list(plan.proj_in) if plan.proj_in is not None else list(range(attn_dim))
        q_rows, k_rows = list(range(attn_dim)), list(range(attn_dim, 2 * attn_dim))
        v_rows = [2 * attn_dim + c for c in value_channels]
        self.num_heads, self.head_dim = heads, head_dim
        self.value_per_head = len(value_channels) // heads
        self.value_padding = head_dim - self.value_per_head if pad_value_heads else 0
        self.widths = (attn_dim, attn_dim, len(value_channels))  # q, k, v output widths
        self.scale = head_dim**-0.5
        self.select_channels = channel_selector(plan.qkv_in, channel_layout)
        self.select_queries = token_selector(plan.kept_tokens)
        self.proj = slice_linear(parts.proj, value_channels, None)
        self.static_attention = (
            None if plan.static_attention is None else _constant(plan.static_attention, parts.proj.weight)
        )
        self.qkv = self.q = self.kv = self.v = None
        if self.static_attention is not None:
            self.v = reading_linear(parts.qkv, plan.qkv_in, v_rows, channel_layout)
            return
        if plan.kept_tokens is None:
            self.qkv = reading_linear(parts.qkv, plan.qkv_in, q_rows + k_rows + v_rows, channel_layout)
        else:
            self.q = reading_linear(parts.qkv, plan.qkv_in, q_rows, channel_layout)
            self.kv = reading_linear(parts.qkv, plan.qkv_in, k_rows + v_rows, channel_layout)
        self.q_norm, self.k_norm = copy.deepcopy(parts.q_norm), copy.deepcopy(parts.k_norm)

    def _split_heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """[B, N, H*width] -> [B, H, N, width]"""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, width).transpose(1, 2)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, N_out, head_dim], k [B, H, N_in, head_dim], v [B, H, N_in, value_per_head]."""
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.widths, dim=-1)
        else:
            q = self.q(self.select_queries(x))
            k, v = self.kv(x).split(self.widths[1:], dim=-1)
        return (
            self._split_heads(q, self.head_dim),
            self._split_heads(k, self.head_dim),
            self._split_heads(v, self.value_per_head),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.select_channels(x)
        if self.static_attention is not None:
            out = torch.matmul(self.static_attention, self._split_heads(self.v(x), self.value_per_head))
        else:
            q, k, v = self._project(x)
            if self.value_padding:
                v = F.pad(v, (0, self.value_padding))
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, scale=self.scale)
            if self.value_padding:
                out = out[..., : self.value_per_head]
        out = out.transpose(1, 2)
        return self.proj(out.reshape(out.shape[0], out.shape[1], self.num_heads * self.value_per_head))


class CompactBlock(nn.Module):
    """A pre-norm ViT block that may aggregate tokens first and output only its kept tokens.

    Input [B, N_before, dim] -> output [B, N_out, dim].
    """

    def __init__(
        self,
        parts: BlockParts,
        plan: BlockPlan,
        geometry: ViTGeometry,
        channel_layout: str = "gather",
        pad_value_heads: bool = False,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = geometry.num_prefix_tokens
        self.token_aggregation = (
            None if plan.token_aggregation is None else _constant(plan.token_aggregation, parts.proj.weight)
        )
        self.select_tokens = token_selector(plan.kept_tokens)
        self.norm1, self.ls1 = copy.deepcopy(parts.norm1), copy.deepcopy(parts.ls1)
        self.attn = CompactAttention(parts, plan, geometry, channel_layout, pad_value_heads)
        self.norm2, self.ls2 = copy.deepcopy(parts.norm2), copy.deepcopy(parts.ls2)
        self.mlp = _compact_mlp(parts, plan, channel_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_aggregation is not None:
            x = aggregate_tokens(x, self.token_aggregation, self.num_prefix_tokens)
        x = self.select_tokens(x) + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _compact_mlp(parts: BlockParts, plan: BlockPlan, channel_layout: str) -> nn.Module:
    """timm's Mlp with fc1 reading only the kept LayerNorm-2 channels and only the kept hidden units."""
    mlp = copy.deepcopy(parts.mlp)
    hidden = None if plan.hidden is None else list(plan.hidden)
    fc1 = reading_linear(parts.fc1, plan.fc1_in, hidden, channel_layout)
    selector = channel_selector(plan.fc1_in, channel_layout)
    mlp.fc1 = fc1 if isinstance(selector, nn.Identity) else nn.Sequential(selector, fc1)
    mlp.fc2 = slice_linear(parts.fc2, hidden, None)
    return mlp


def compact_from_plan(
    model: nn.Module,
    plan: SlimPlan,
    token_layout: str = "gather",
    channel_layout: str = "gather",
    pad_value_heads: bool = False,
) -> nn.Module:
    """A new, physically slim module computing `plan` on `model` (which is left untouched).

    Input [B, C, H, W] images -> the model's usual output (logits). `token_layout` is "gather"
    (constant-index Gather per block) or "slice" (one permutation, then Slices; nested plans only);
    `channel_layout` is "gather" or "masked" (CHANNEL_LAYOUTS); `pad_value_heads`: see
    CompactAttention.
    """
    geometry = supported_geometry(model)
    validate(plan, geometry)
    if token_layout not in TOKEN_LAYOUTS:
        raise ExportError(f"unknown token layout {token_layout!r}: choose one of {TOKEN_LAYOUTS}")
    if channel_layout not in CHANNEL_LAYOUTS:
        raise ExportError(f"unknown channel layout {channel_layout!r}: choose one of {CHANNEL_LAYOUTS}")
    blocks: list[nn.Module] = []
    if token_layout == "slice":
        permutation, plan = slice_layout(plan, geometry)
        blocks.append(SelectIndices(permutation, dim=1))
    compact = copy.deepcopy(model)
    blocks += [
        CompactBlock(block_parts(block), block_plan, geometry, channel_layout, pad_value_heads)
        for block, block_plan in zip(blocks_of(model), plan.blocks)
    ]
    replace_blocks(compact, blocks)
    return compact.eval()
