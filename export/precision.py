"""FP16 ONNX for strongly typed TensorRT (10 built strongly typed, 11, RTX) and onnxruntime,
which take precisions from the graph.

Every op runs in fp16: no fp32 islands. LayerNormalization, Softmax and fused attention
accumulate in fp32 inside TensorRT and onnxruntime already, and the Casts that kept LayerNorm and
Softmax in fp32 (76 in DeiT-S) cost time on onnxruntime-gpu. BENCHMARKS.md ("fp16 without fp32
islands") has the accuracy measured with and without them. Inputs and
outputs stay fp32, so callers feed the same images and read the same logits.
"""

from __future__ import annotations

import onnx

from .errors import ExportError

# Ops the converter keeps in fp32 (with Casts around them). Empty: no measurement has shown one
# that needs it. The converter's own default list is not used: it holds no op of our graphs.
FP32_OPS: tuple[str, ...] = ()


def fp16_from_fp32(model: onnx.ModelProto, fp32_ops: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(fp32_ops), disable_shape_infer=False
    )
    return _single_assignment(converted)


def _single_assignment(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop repeated Casts of one tensor: the converter writes one Cast per fp32 consumer of an
    initializer, all named '<initializer>_cast_to_fp32', and the exporter shares equal initializers
    (a freshly initialised model's LayerNorms), which broke onnx.checker's single assignment."""
    seen: dict[str, tuple] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Cast" and len(node.output) == 1:
            key = (tuple(node.input), tuple((a.name, a.i) for a in node.attribute))
            if node.output[0] in seen:
                if seen[node.output[0]] != key:
                    raise ExportError(
                        f"the fp16 converter wrote two different Casts to {node.output[0]}: export fp32 and report this"
                    )
                continue
            seen[node.output[0]] = key
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model
