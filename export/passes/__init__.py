"""Graph passes over exported ONNX models, registered by name (see registry.py).

Each pass module registers itself when imported; this package imports all of them explicitly, so
GRAPH_PASSES is complete as soon as the package is imported.
"""

from . import fold_constants, ort_fusions, ort_multihead_attention, toposort  # noqa: F401  (importing a pass registers it)
from .registry import DEFAULT_PASSES, GRAPH_PASSES, apply_passes, register_pass

__all__ = ["DEFAULT_PASSES", "GRAPH_PASSES", "apply_passes", "register_pass"]
