"""The registry of graph passes over exported ONNX models, and `apply_passes`.

A pass takes an onnx-graphsurgeon Graph, edits it, ends with cleanup().toposort(), returns the
graph, and is idempotent. `apply_passes` runs a list of them and logs node counts.
"""

from __future__ import annotations

import logging
from typing import Callable

import onnx

from ..errors import ExportError

log = logging.getLogger(__name__)

GraphPass = Callable[["object"], "object"]
GRAPH_PASSES: dict[str, GraphPass] = {}
DEFAULT_PASSES = ("fold_constants",)


def register_pass(name: str) -> Callable[[GraphPass], GraphPass]:
    def register(function: GraphPass) -> GraphPass:
        if name in GRAPH_PASSES:
            raise ValueError(f"graph pass {name!r} registered twice")
        GRAPH_PASSES[name] = function
        return function

    return register


def apply_passes(model: onnx.ModelProto, names: tuple[str, ...] = DEFAULT_PASSES) -> onnx.ModelProto:
    """Run the named passes in order on `model` and return the new model."""
    import onnx_graphsurgeon as gs

    unknown = [n for n in names if n not in GRAPH_PASSES]
    if unknown:
        raise ExportError(f"unknown graph pass(es) {unknown}; registered: {sorted(GRAPH_PASSES)}")
    graph = gs.import_onnx(model)
    for name in names:
        before = len(graph.nodes)
        graph = GRAPH_PASSES[name](graph)
        log.info("pass %s: %d -> %d nodes", name, before, len(graph.nodes))
    return gs.export_onnx(graph)
