"""Fold every subgraph that depends only on constants (e.g. shape arithmetic, transposed weights)."""

from __future__ import annotations

from .registry import register_pass


@register_pass("fold_constants")
def fold_constants(graph):
    return graph.fold_constants().cleanup().toposort()
