"""Analytic multiply-accumulate (MAC) and parameter accounting that honours a plan: the one place
where vitslim counts cost. LayerNorm, softmax, GELU and additions are not counted (the convention
of the ViT pruning literature)."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import BlockPlan, SlimPlan, TokenCounts, dense_plan, token_counts
from .timm_adapter import ViTGeometry


@dataclass(frozen=True)
class BlockWidths:
    """The widths a block computes with once its plan is applied."""

    qkv_in: int
    value_per_head: int
    fc1_in: int
    hidden: int


def kept_channels(block: BlockPlan, geometry: ViTGeometry) -> dict[str, int]:
    """How many channels of each prunable space (CHANNEL_SPACES) the block keeps."""
    return {
        space: size if getattr(block, space) is None else len(getattr(block, space))
        for space, size in geometry.channel_sizes.items()
    }


def block_widths(block: BlockPlan, geometry: ViTGeometry) -> BlockWidths:
    kept = kept_channels(block, geometry)
    return BlockWidths(
        qkv_in=kept["qkv_in"],
        value_per_head=kept["proj_in"] // geometry.num_heads,
        fc1_in=kept["fc1_in"],
        hidden=kept["hidden"],
    )


def block_macs(block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts) -> dict[str, int]:
    """MACs of one block by part, for one image.

    counts.arriving: tokens before aggregation; counts.read: tokens after it (keys and values);
    counts.written: tokens written (queries, residual, MLP rows).
    """
    n_before, n_in, n_out = counts.arriving, counts.read, counts.written
    widths = block_widths(block, geometry)
    heads, head_dim, dim = geometry.num_heads, geometry.head_dim, geometry.dim
    value_dim = heads * widths.value_per_head
    macs = {
        "aggregation": 0,
        "qk_proj": 0,
        "qk_scores": 0,
        "v_proj": n_in * widths.qkv_in * value_dim,
        "attn_v": heads * n_out * n_in * widths.value_per_head,
        "proj": n_out * value_dim * dim,
        "fc1": n_out * widths.fc1_in * widths.hidden,
        "fc2": n_out * widths.hidden * dim,
    }
    if block.token_aggregation is not None:
        macs["aggregation"] = (n_in - geometry.num_prefix_tokens) * (n_before - geometry.num_prefix_tokens) * dim
    if block.static_attention is None:
        macs["qk_proj"] = (n_out + n_in) * widths.qkv_in * heads * head_dim
        macs["qk_scores"] = heads * n_out * n_in * head_dim
    return macs


def macs_fraction(plan: SlimPlan, geometry: ViTGeometry) -> float:
    """MACs of `plan` over the dense model's (1 / the MAC-ideal speed-up); plan must be valid."""
    return plan_macs(plan, geometry)["total"] / plan_macs(dense_plan(plan.model, geometry.depth), geometry)["total"]


def plan_macs(plan: SlimPlan, geometry: ViTGeometry) -> dict:
    """{"total", "patch_embed", "head", "blocks": [per-block total]} for one image; plan must be valid."""
    per_block = [
        sum(block_macs(block, geometry, counts).values())
        for block, counts in zip(plan.blocks, token_counts(plan, geometry))
    ]
    total = geometry.patch_embed_macs + geometry.head_macs + sum(per_block)
    return {"total": total, "patch_embed": geometry.patch_embed_macs, "head": geometry.head_macs, "blocks": per_block}
