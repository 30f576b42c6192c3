"""INT8 Q/DQ of exported graphs: placement (only the Linear layers, nothing inside LayerNorm,
Softmax, GELU or the attention chain), parity on a tiny model, the TensorRT-RTX build, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_vit
from vitslim.export.errors import ExportError
from vitslim.export.onnx_export import export_plan, run_onnxruntime
from vitslim.export.quantize import quantize_int8, weight_matmuls
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan

from vitslim.core.precision import compare_outputs, graph_precision

SPEC = ModelSpec("deit_tiny_patch16_224")
IMAGES = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
FLOAT_ISLANDS = ("LayerNormalization", "Softmax", "Attention", "Gelu", "Erf", "Add", "Mul", "Div")


def _exported(root, attention: str):
    model = tiny_vit(depth=3)
    plan = dense_plan(SPEC, 3).with_block(
        1, BlockPlan(kept_tokens=(0, 1, 3, 5, 7), qkv_in=tuple(range(24)), hidden=tuple(range(0, 128, 2)))
    )
    fp32 = export_plan(model, plan, root / "m.onnx", images=IMAGES[:8], attention=attention).onnx_path
    return root, fp32, quantize_int8(fp32, root / "m.int8.onnx", IMAGES.numpy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _exported(tmp_path_factory.mktemp("q"), "attention-op")


@pytest.fixture(scope="module")
def exported_matmul_softmax(tmp_path_factory):
    return _exported(tmp_path_factory.mktemp("q"), "matmul-softmax")


@pytest.mark.parametrize("form, attention_matmuls", [("exported", 0), ("exported_matmul_softmax", 6)])
def test_qdq_sits_only_on_the_linear_layers(request, form, attention_matmuls):
    """Either TensorRT form: Q/DQ on every Linear and nowhere else; attention (the Attention op,
    or the MatMul -> Softmax -> MatMul chain) stays float."""
    _, fp32, result = request.getfixturevalue(form)
    model = onnx.load(str(result.onnx_path))
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        inputs_from_dq = [
            name for name in node.input if name in producers and producers[name].op_type == "DequantizeLinear"
        ]
        if node.op_type in FLOAT_ISLANDS:
            assert not inputs_from_dq, f"{node.op_type} {node.name} reads a dequantized tensor"
        if (
            node.op_type == "QuantizeLinear"
        ):  # never attention probabilities or the inside of GELU (its last Mul is its output)
            source = producers.get(node.input[0])
            assert source is None or source.op_type not in ("Softmax", "Erf"), source.op_type
    with_weight, attention = weight_matmuls(onnx.load(str(fp32)))
    by_name = {node.name: node for node in model.graph.node}
    for name in attention:  # Q·Kᵀ and attention·V stay float: MatMul -> Softmax -> MatMul as TensorRT fuses it
        assert not any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in by_name[name].input
        )
    for name in with_weight:
        assert all(i in producers and producers[i].op_type == "DequantizeLinear" for i in by_name[name].input[:2]), name
    assert set(result.report["dq_consumers"]) <= {"MatMul", "Gemm", "Gather", "Slice"}
    assert (
        result.report["quantized_layers"] == len(with_weight) >= 3 * 4 + 1
        and result.report["attention_matmuls_in_float"] == attention_matmuls
    )
    assert graph_precision(model) == "int8" and result.report["onnx"]["bytes"] < 0.6 * result.report["source"]["bytes"]


def test_int8_follows_fp32(exported):
    _, fp32, result = exported
    images = IMAGES.numpy()
    parity = compare_outputs(run_onnxruntime(fp32, images), run_onnxruntime(result.onnx_path, images))
    # random weights: logits lie close together, so cosine rather than top-1 (the digits run checks top-1)
    assert parity.cosine > 0.98


def test_int8_builds_with_tensorrt(exported, tmp_path):
    from vitslim.deploy.build import engine_from_onnx
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is None:
        pytest.skip("no TensorRT installed")
    manifest = engine_from_onnx(exported[2].onnx_path, tmp_path / "m.engine").manifest
    assert manifest["precision"] == "int8" and manifest["tolerance"] == "int8"


def test_refusals(exported, tmp_path):
    root, fp32, result = exported
    with pytest.raises(ExportError, match="already quantized"):
        quantize_int8(result.onnx_path, tmp_path / "x.onnx", IMAGES.numpy())
    with pytest.raises(ExportError, match="needs calibration images"):
        quantize_int8(fp32, tmp_path / "x.onnx", np.zeros((0, 3, 16, 16), dtype=np.float32))
    fp16 = export_plan(
        tiny_vit(depth=3), dense_plan(SPEC, 3), tmp_path / "h.onnx", images=IMAGES[:8], precision="fp16"
    ).onnx_path
    with pytest.raises(ExportError, match="is an fp16 export"):
        quantize_int8(fp16, tmp_path / "x.onnx", IMAGES.numpy())
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        )
    )
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ExportError, match="not a ViT exported by vitslim"):
        quantize_int8(tmp_path / "plain.onnx", tmp_path / "x.onnx", IMAGES.numpy())
    assert not (tmp_path / "x.onnx").exists()
