"""FP16 ONNX for strongly typed TensorRT (10 built strongly typed, 11, RTX), which takes
precisions from the graph.

onnxruntime's float16 converter casts weights and activations to fp16 and keeps LayerNorm and
Softmax in fp32 (their reductions overflow or lose too much in fp16). Inputs and outputs stay
fp32 so callers feed the same images and read the same logits.
"""
from __future__ import annotations

import onnx

FP32_OPS = ("LayerNormalization", "Softmax")


def fp16_from_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OPS), disable_shape_infer=False)
