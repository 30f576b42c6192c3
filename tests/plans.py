"""Hypothesis strategy for random valid SlimPlans that mix every field in one model."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan
from vitslim.pruning.timm_adapter import ViTGeometry

FIELDS = ("token_aggregation", "kept_tokens", "qkv_in", "static_attention", "proj_in", "fc1_in", "hidden")


def _subset(generator: torch.Generator, size: int, count: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(sorted(offset + i for i in torch.randperm(size, generator=generator)[:count].tolist()))


def _block(draw, geometry: ViTGeometry, n_in: int, use: set, generator: torch.Generator) -> tuple[BlockPlan, int]:
    prefix, fields = geometry.num_prefix_tokens, {}
    if "token_aggregation" in use and n_in > prefix:
        rows = draw(st.integers(1, n_in - prefix))
        fields["token_aggregation"] = torch.randn(rows, n_in - prefix, generator=generator) / (n_in - prefix) ** 0.5
        n_in = prefix + rows
    n_out = n_in
    if "kept_tokens" in use and n_in > prefix:
        keep = draw(st.integers(1, n_in - prefix))  # >= 1 patch so later blocks can still aggregate
        fields["kept_tokens"] = tuple(range(prefix)) + _subset(generator, n_in - prefix, keep, offset=prefix)
        n_out = len(fields["kept_tokens"])
    for name, size in (("qkv_in", geometry.dim), ("fc1_in", geometry.dim), ("hidden", geometry.mlp_hidden)):
        if name in use:
            fields[name] = _subset(generator, size, draw(st.integers(1, size)))
    if "proj_in" in use:
        per_head = draw(st.integers(1, geometry.head_dim))
        fields["proj_in"] = tuple(
            sorted(
                c
                for h in range(geometry.num_heads)
                for c in _subset(generator, geometry.head_dim, per_head, h * geometry.head_dim)
            )
        )
    if "static_attention" in use:
        fields["static_attention"] = torch.randn(geometry.num_heads, n_out, n_in, generator=generator).softmax(-1)
    return BlockPlan(**fields), n_out


@st.composite
def random_plans(draw, geometry: ViTGeometry, spec: ModelSpec = ModelSpec("tiny")) -> SlimPlan:
    """A valid plan in which every field of FIELDS is used by at least one block (block 0 if no other).

    Blocks always keep at least one patch token; prefix-only blocks are tested by hand.
    """
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    uses = [set(f for f in FIELDS if draw(st.booleans())) for _ in range(geometry.depth)]
    for field in FIELDS:
        if not any(field in use for use in uses):
            uses[0].add(field)
    blocks, n_in = [], geometry.num_tokens
    for use in uses:
        block, n_in = _block(draw, geometry, n_in, use, generator)
        blocks.append(block)
    return SlimPlan(model=spec, blocks=tuple(blocks), method="random")
