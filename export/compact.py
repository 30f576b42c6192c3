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
from torch import nn

from pruning.plan import BlockPlan, SlimPlan, validate
from pruning.reference import aggregate_tokens
from pruning.timm_adapter import BlockParts, ViTGeometry, block_parts, blocks_of, replace_blocks, supported_geometry

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


def slice_linear(linear: nn.Linear, in_indices: Optional[list[int]] = None, out_indices: Optional[list[int]] = None) -> nn.Linear:
    """A new Linear with only the given input columns and output rows of `linear` (None keeps all)."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if out_indices is not None:
        weight = weight[out_indices]
        bias = None if bias is None else bias[out_indices]
    if in_indices is not None:
        weight = weight[:, in_indices]
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced


def _constant(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().to(device=like.device, dtype=like.dtype).clone(), requires_grad=False)


class CompactAttention(nn.Module):
    """Rectangular multi-head attention: queries for the kept tokens only, keys/values for all.

    Input [B, N_in, C] (LayerNorm-1 output); output [B, N_out, dim]. With a static matrix
    [H, N_out, N_in] the q/k projections, the scores and the softmax are gone.
    """

    def __init__(self, parts: BlockParts, plan: BlockPlan, geometry: ViTGeometry) -> None:
        super().__init__()
        heads, head_dim = geometry.num_heads, geometry.head_dim
        attn_dim = geometry.attn_dim
        value_channels = list(plan.proj_in) if plan.proj_in is not None else list(range(attn_dim))
        qkv_in = None if plan.qkv_in is None else list(plan.qkv_in)
        self.num_heads, self.head_dim = heads, head_dim
        self.value_per_head = len(value_channels) // heads
        self.scale = head_dim ** -0.5
        self.select_channels = nn.Identity() if qkv_in is None else SelectIndices(plan.qkv_in, dim=-1)
        self.select_queries = token_selector(plan.kept_tokens)
        self.v = slice_linear(parts.qkv, qkv_in, [2 * attn_dim + c for c in value_channels])
        self.proj = slice_linear(parts.proj, value_channels, None)
        if plan.static_attention is None:
            self.static_attention = None
            self.q = slice_linear(parts.qkv, qkv_in, list(range(attn_dim)))
            self.k = slice_linear(parts.qkv, qkv_in, list(range(attn_dim, 2 * attn_dim)))
            self.q_norm, self.k_norm = copy.deepcopy(parts.q_norm), copy.deepcopy(parts.k_norm)
        else:
            self.static_attention = _constant(plan.static_attention, parts.proj.weight)

    def _split_heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """[B, N, H*width] -> [B, H, N, width]"""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, width).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.select_channels(x)
        v = self._split_heads(self.v(x), self.value_per_head)
        if self.static_attention is not None:
            attn = self.static_attention
        else:
            q = self.q_norm(self._split_heads(self.q(self.select_queries(x)), self.head_dim))
            k = self.k_norm(self._split_heads(self.k(x), self.head_dim))
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.proj(out.reshape(out.shape[0], out.shape[1], self.num_heads * self.value_per_head))


class CompactBlock(nn.Module):
    """A pre-norm ViT block that may aggregate tokens first and output only its kept tokens.

    Input [B, N_before, dim] -> output [B, N_out, dim].
    """

    def __init__(self, parts: BlockParts, plan: BlockPlan, geometry: ViTGeometry) -> None:
        super().__init__()
        self.num_prefix_tokens = geometry.num_prefix_tokens
        self.token_aggregation = None if plan.token_aggregation is None else _constant(plan.token_aggregation, parts.proj.weight)
        self.select_tokens = token_selector(plan.kept_tokens)
        self.norm1, self.ls1 = copy.deepcopy(parts.norm1), copy.deepcopy(parts.ls1)
        self.attn = CompactAttention(parts, plan, geometry)
        self.norm2, self.ls2 = copy.deepcopy(parts.norm2), copy.deepcopy(parts.ls2)
        self.mlp = _compact_mlp(parts, plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_aggregation is not None:
            x = aggregate_tokens(x, self.token_aggregation, self.num_prefix_tokens)
        x = self.select_tokens(x) + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _compact_mlp(parts: BlockParts, plan: BlockPlan) -> nn.Module:
    """timm's Mlp with fc1 reading only the kept LayerNorm-2 channels and only the kept hidden units."""
    mlp = copy.deepcopy(parts.mlp)
    hidden = None if plan.hidden is None else list(plan.hidden)
    fc1 = slice_linear(parts.fc1, None if plan.fc1_in is None else list(plan.fc1_in), hidden)
    mlp.fc1 = fc1 if plan.fc1_in is None else nn.Sequential(SelectIndices(plan.fc1_in, dim=-1), fc1)
    mlp.fc2 = slice_linear(parts.fc2, hidden, None)
    return mlp


def compact_from_plan(model: nn.Module, plan: SlimPlan, token_layout: str = "gather") -> nn.Module:
    """A new, physically slim module computing `plan` on `model` (which is left untouched).

    Input [B, C, H, W] images -> the model's usual output (logits). `token_layout` is "gather"
    (constant-index Gather per block) or "slice" (one permutation, then Slices; nested plans only).
    """
    geometry = supported_geometry(model)
    validate(plan, geometry)
    if token_layout not in TOKEN_LAYOUTS:
        raise ExportError(f"unknown token layout {token_layout!r}: choose one of {TOKEN_LAYOUTS}")
    blocks: list[nn.Module] = []
    if token_layout == "slice":
        permutation, plan = slice_layout(plan, geometry)
        blocks.append(SelectIndices(permutation, dim=1))
    compact = copy.deepcopy(model)
    blocks += [CompactBlock(block_parts(block), block_plan, geometry) for block, block_plan in zip(blocks_of(model), plan.blocks)]
    replace_blocks(compact, blocks)
    return compact.eval()
