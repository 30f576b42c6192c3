"""Token layouts for index-static token selection.

"gather": every block selects its kept tokens with a constant-index Gather.
"slice": Patch-Slimming-style plans have nested token sets, so one constant permutation of the
tokens after the position embedding (tokens kept deepest first) turns every later selection into
a prefix, which the compact module expresses as a Slice.
"""

from __future__ import annotations

from dataclasses import replace

from vitslim.pruning.plan import SlimPlan
from vitslim.pruning.timm_adapter import ViTGeometry

from .errors import ExportError

TOKEN_LAYOUTS = ("gather", "slice")


def token_sets(plan: SlimPlan, num_tokens: int) -> list[tuple[int, ...]]:
    """Original token ids each block outputs, for a plan whose only token operation is selection."""
    current, sets = tuple(range(num_tokens)), []
    for block in plan.blocks:
        if block.token_aggregation is not None:
            raise ExportError("token_layout='slice' cannot follow token aggregation: use the gather layout")
        if block.kept_tokens is not None:
            current = tuple(current[p] for p in block.kept_tokens)
        sets.append(current)
    return sets


def slice_layout(plan: SlimPlan, geometry: ViTGeometry) -> tuple[tuple[int, ...], SlimPlan]:
    """(permutation of the N tokens, plan in which every kept set is a prefix of its input).

    Tokens are ordered by the last block that still outputs them, deepest first (ties by id), so
    prefix tokens, kept everywhere, stay first.
    """
    if any(b.static_attention is not None for b in plan.blocks):
        raise ExportError("token_layout='slice' does not permute static attention matrices: use the gather layout")
    sets = token_sets(plan, geometry.num_tokens)
    last_block = {token: -1 for token in range(geometry.num_tokens)}
    for index, kept in enumerate(sets):
        for token in kept:
            last_block[token] = index
    permutation = tuple(sorted(range(geometry.num_tokens), key=lambda token: (-last_block[token], token)))
    blocks = [
        replace(block, kept_tokens=None if block.kept_tokens is None else tuple(range(len(kept))))
        for block, kept in zip(plan.blocks, sets)
    ]
    return permutation, replace(plan, blocks=tuple(blocks))


def is_prefix(kept: tuple[int, ...]) -> bool:
    return kept == tuple(range(len(kept)))
