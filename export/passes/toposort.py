"""Remove dead nodes and sort topologically (e.g. after a converter appended cast nodes at the end)."""

from __future__ import annotations

from .registry import register_pass


@register_pass("toposort")
def toposort(graph):
    return graph.cleanup().toposort()
