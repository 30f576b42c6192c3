"""A latency table built in a test: every point costs a fixed time plus a time per MAC (the shape a
runtime that is all arithmetic would give), complete and valid for any supported geometry."""

from __future__ import annotations

import torch
from vitslim.pruning.latency import few_tokens_counts, table_geometry, width_block, written_count
from vitslim.pruning.macs import block_macs
from vitslim.pruning.plan import BlockPlan, TokenCounts
from vitslim.pruning.timm_adapter import ViTGeometry

from vitslim.latency_table import aggregation_points, grid_points

FIXED_MS = 0.05
PER_MAC_MS = 1e-6


def block_ms(block: BlockPlan, counts: TokenCounts, geometry: ViTGeometry) -> float:
    return 0.01 + PER_MAC_MS * sum(block_macs(block, geometry, counts).values())


def mac_table(geometry: ViTGeometry, timm_ms: float = 1.0) -> dict:
    """A complete table on the grid `vitslim latency-table` times, whose every block point costs
    0.01 ms plus PER_MAC_MS per MAC (an aggregation 0.001 ms plus that)."""
    blocks = []
    for point in grid_points(geometry):
        block = width_block(geometry, point["attention_width"], point["mlp_width"])
        if point["static"]:
            block = BlockPlan(static_attention=torch.zeros(1))
        read = point["read"]
        written = written_count(geometry, read, point["kept"])
        blocks.append({**point, "ms": block_ms(block, TokenCounts(read, read, written), geometry)})
    aggregations, prefix = [], geometry.num_prefix_tokens
    for point in aggregation_points(geometry):
        read = point["arriving"]
        patches_out = max(1, round(point["pooled"] * (read - prefix)))
        aggregations.append({**point, "ms": 0.001 + PER_MAC_MS * patches_out * (read - prefix) * geometry.dim})
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
