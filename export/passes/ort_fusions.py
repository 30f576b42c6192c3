"""onnxruntime's transformer fusions (SkipLayerNormalization, BiasGelu, FastGelu, and its own
attention fusion where the graph matches it): com.microsoft ops that only onnxruntime runs.

An optional pass for graphs that onnxruntime will run; BENCHMARKS.md says whether it pays on the
GPU. Only the offline Python fusions run (opt_level 0), so the graph stays device-neutral.
"""

from __future__ import annotations

import logging

from .registry import register_pass

log = logging.getLogger(__name__)


@register_pass("ort_fusions")
def ort_fusions(graph):
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: the optimizer reads them per node (pruned blocks differ in width)
    optimized = optimize_model(
        gs.export_onnx(graph), model_type="vit", num_heads=0, hidden_size=0, opt_level=0, use_gpu=True
    )
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    log.info("ort_fusions: %s", fused or "nothing matched")
    return gs.import_onnx(optimized.model).cleanup().toposort()
