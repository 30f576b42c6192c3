"""A latency table built in a test: every point costs a fixed time plus a time per MAC (the shape a
runtime that is all arithmetic would give), complete and valid for any supported geometry."""

from __future__ import annotations

import torch
from vitslim.pruning.latency import (
    few_tokens_counts,
    table_geometry,
    value_step,
    width_block,
    width_step,
    written_count,
)
from vitslim.pruning.macs import block_macs
from vitslim.pruning.plan import BlockPlan, TokenCounts
from vitslim.pruning.timm_adapter import ViTGeometry

FIXED_MS = 0.05
PER_MAC_MS = 1e-6


def block_ms(block: BlockPlan, counts: TokenCounts, geometry: ViTGeometry) -> float:
    return 0.01 + PER_MAC_MS * sum(block_macs(block, geometry, counts).values())


def mac_table(geometry: ViTGeometry, timm_ms: float = 1.0) -> dict:
    """A complete table whose every point costs 0.01 ms plus PER_MAC_MS per MAC."""
    blocks, aggregations = [], []
    full = {"kept": 1.0, "attention_width": 1.0, "mlp_width": 1.0}
    prefix, patches = geometry.num_prefix_tokens, geometry.num_patches
    reads = sorted({prefix + 1, *(prefix + max(1, patches * k // 16) for k in (2, 4, 8, 12, 16))})
    for read in reads:
        points = [{"static": True, **full}]
        points += [{"static": False, **full, "kept": kept} for kept in (0.0, 0.25, 0.5, 0.75, 1 - 1 / patches, 1.0)]
        widths = {side: {0.25, 0.5, 0.75, width_step(geometry)} for side in ("attention_width", "mlp_width")}
        widths["attention_width"] |= {value_step(geometry)} - {None}
        points += [{"static": False, **full, side: width} for side, grid in widths.items() for width in sorted(grid)]
        for point in points:
            block = width_block(geometry, point["attention_width"], point["mlp_width"])
            if point["static"]:
                block = BlockPlan(static_attention=torch.zeros(1))
            written = written_count(geometry, read, point["kept"])
            blocks.append({**point, "read": read, "ms": block_ms(block, TokenCounts(read, read, written), geometry)})
        if read > prefix + 1:
            for pooled in (0.125, 0.5, 1.0):
                patches_out = max(1, round(pooled * (read - prefix)))
                ms = 0.001 + PER_MAC_MS * patches_out * (read - prefix) * geometry.dim
                aggregations.append({"arriving": read, "pooled": pooled, "ms": ms})
    return {
        "table_version": 3,
        "model": {"name": "tiny", "kwargs": {}},
        "geometry": table_geometry(geometry),
        "where": {"runtime": "made in a test", "backend": "torch", "device": "cpu", "precision": "fp32"},
        "batch": 4,
        "fixed_ms": FIXED_MS,
        "timm_ms": timm_ms,
        "dense_ms": FIXED_MS
        + geometry.depth * block_ms(BlockPlan(), TokenCounts(*(geometry.num_tokens,) * 3), geometry),
        "few_tokens_ms": FIXED_MS + sum(block_ms(BlockPlan(), c, geometry) for c in few_tokens_counts(geometry)),
        "blocks": blocks,
        "aggregations": aggregations,
    }
