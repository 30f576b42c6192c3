"""INT8 ONNX with explicit QuantizeLinear/DequantizeLinear (Q/DQ) pairs, as strongly typed
TensorRT (11, RTX) and TensorRT 10's explicit-quantization mode take it.

Placement and calibration are onnxruntime's `quantize_static` (QDQ format), restricted to what
TensorRT runs well in INT8 on a ViT: the Linear layers, i.e. MatMul/Gemm nodes whose second input
is a constant weight. Weights: symmetric INT8 per output channel; activations: symmetric INT8 per
tensor (zero point 0, what TensorRT requires), ranges from min/max over calibration images.
Everything else stays in floating point: LayerNorm, Softmax and GELU (precision-sensitive, and
TensorRT fuses them in float), the residual Adds, the token Gathers/Slices, the patch-embedding
Conv, and attention: the ONNX Attention op (or, in the matmul-softmax form, the two
activation-by-activation MatMuls Q·Kᵀ and attention·V, so that the MatMul → Softmax → MatMul chain
keeps the float form TensorRT's attention fusion matches).

Why onnxruntime's quantizer rather than NVIDIA Model Optimizer (compared in docs/int8.md,
with benchmarks/modelopt_int8.py): equal or better accuracy on the digits models, the placement
this module wants (Model Optimizer also quantizes attention's MatMuls, LayerNorm inputs and the
residual Adds), half the file size, it runs in onnxruntime on the CPU so the accuracy is measured
here, and it is installed already (Model Optimizer brings torch and CuPy). FP8: onnxruntime's
quantizer writes FP8 Q/DQ, but its CPU provider cannot run them, so FP8 accuracy cannot be
measured on this machine; it is not offered.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from vitslim.core.files import atomic_path
from vitslim.core.metadata import QUANTIZATION_KEY, write_metadata

from .errors import ExportError

QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")
# data movement between a LayerNorm and the Linear that reads some of its channels or tokens:
# onnxruntime puts the activation's Q/DQ before it (the same numbers: one scale per tensor)
MOVEMENT_OP_TYPES = ("Gather", "Slice", "Reshape", "Transpose")
# ops kept in floating point, and why (the report lists what the graph holds of each)
FLOAT_OPS = {
    "LayerNormalization": "precision-sensitive normalisation; TensorRT fuses it in float",
    "Softmax": "attention probabilities; kept float so TensorRT's attention fusion matches",
    "Attention": "the fused attention op (scores, softmax, weighted sum); float, as TensorRT's fused attention runs it",
    "MultiHeadAttention": "onnxruntime's fused attention; float",
    "Gelu": "GELU; precision-sensitive, fused in float",
    "Erf": "GELU; precision-sensitive, fused in float",
    "Add": "residual adds and biases; cheap, and INT8 residuals lose accuracy",
    "Mul": "GELU and scaling; elementwise",
    "Div": "GELU and scaling; elementwise",
    "Conv": "patch embedding: one small layer",
    "Gather": "token and channel selection: data movement",
    "Slice": "token selection: data movement",
}


@dataclass(frozen=True)
class QuantizeResult:
    onnx_path: Path
    report: dict


def weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(names of MatMul/Gemm nodes with a constant weight, names of those multiplying two
    activations: attention's Q·Kᵀ and attention·V)."""
    constants = {init.name for init in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    with_weight, between_activations = [], []
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OP_TYPES:
            (with_weight if len(node.input) > 1 and node.input[1] in constants else between_activations).append(
                node.name
            )
    return with_weight, between_activations


def check_quantizable(model: onnx.ModelProto, source: Path) -> None:
    """Refuse a graph that is already quantized, an fp16 export, or one with no Linear layer."""
    ops = Counter(node.op_type for node in model.graph.node)
    if any(ops[op] for op in QDQ_OP_TYPES):
        raise ExportError(
            f"{source} is already quantized ({ops['QuantizeLinear']} QuantizeLinear nodes): quantize the fp32 export instead"
        )
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        raise ExportError(f"{source} is an fp16 export: quantize the fp32 export (vitslim export --precision fp32)")
    if not weight_matmuls(model)[0]:
        raise ExportError(
            f"{source} has no MatMul/Gemm with a constant weight: not a ViT exported by vitslim ('vitslim export')"
        )


class _Images:
    """onnxruntime's CalibrationDataReader over a numpy array, in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int) -> None:
        self.batches = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> Optional[dict]:
        return next(self.batches, None)


def qdq_placement(model: onnx.ModelProto) -> dict:
    """Which op types consume DequantizeLinear outputs (should be only MatMul/Gemm), and how many."""
    consumers: Counter = Counter()
    dq_outputs = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if any(name in dq_outputs for name in node.input):
            consumers[node.op_type] += 1
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "dq_consumers": dict(consumers),
        "float_ops": {op: {"count": ops[op], "why": why} for op, why in FLOAT_OPS.items() if ops[op]},
    }


def quantize_int8(
    onnx_path: str | Path, out_path: str | Path, calibration_images: np.ndarray, batch: int = 32
) -> QuantizeResult:
    """Write an INT8 Q/DQ version of the fp32 ONNX at `onnx_path` to `out_path` (atomically),
    calibrated on `calibration_images` [N, C, H, W] (N >= 1)."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path))
    check_quantizable(model, onnx_path)
    if calibration_images is None or len(calibration_images) == 0:
        raise ExportError(
            "INT8 needs calibration images: pass --data (its training split is sampled) and --calibration-images N >= 1"
        )
    quantized_nodes, attention = weight_matmuls(model)
    logging.disable(logging.WARNING)  # onnxruntime's quantizer logs advice to the root logger on every call
    try:
        with atomic_path(out_path) as tmp:
            _write_quantized(onnx_path, tmp, model, calibration_images, batch, quantized_nodes)
            quantized = onnx.load(str(tmp))
            placement = qdq_placement(quantized)
            stray = sorted(set(placement["dq_consumers"]) - set(QUANTIZED_OP_TYPES) - set(MOVEMENT_OP_TYPES))
            if stray:
                raise ExportError(f"quantization put Q/DQ before {stray}, which must stay in float; nothing written")
            write_metadata(
                quantized,
                {QUANTIZATION_KEY: "int8 Q/DQ: Linear weights per channel, activations per tensor, symmetric"},
            )
            onnx.save(quantized, str(tmp))
            size = tmp.stat().st_size
    finally:
        logging.disable(logging.NOTSET)
    report = {
        "source": {"file": onnx_path.name, "bytes": onnx_path.stat().st_size},
        "onnx": {"file": out_path.name, "bytes": size},
        "precision": "int8",
        "calibration_images": int(len(calibration_images)),
        "calibration_method": "min/max, symmetric",
        "quantized_layers": len(quantized_nodes),
        "attention_matmuls_in_float": len(attention),
        **placement,
    }
    return QuantizeResult(onnx_path=out_path, report=report)


def _write_quantized(
    onnx_path: Path,
    tmp: Path,
    model: onnx.ModelProto,
    calibration_images: np.ndarray,
    batch: int,
    quantized_nodes: list[str],
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(onnx_path),
        str(tmp),
        _Images(model.graph.input[0].name, calibration_images.astype(np.float32), batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        nodes_to_quantize=quantized_nodes,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # inputs only: a Linear's output stays float into its bias Add and the residual
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
            "QuantizeBias": False,
        },  # TensorRT dequantizes only 8-bit (and smaller) types, not INT32 biases
    )
