"""Attention forms and fp16 graphs: what each form writes, the fp16 graph without fp32 islands,
and the single-assignment fix for a freshly initialised model."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from conftest import tiny_vit
from vitslim.export.attention_form import ATTENTION_FORMS, attention_form
from vitslim.export.compact import compact_from_plan
from vitslim.export.errors import ExportError
from vitslim.export.onnx_export import export_plan, onnx_from_module
from vitslim.export.passes import apply_passes
from vitslim.export.precision import fp16_from_fp32
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan

from vitslim.core.metadata import attention_form_of

IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
SPEC = ModelSpec("deit_tiny_patch16_224")


def _vtp_and_tokens_plan():
    """Rectangular attention (kept tokens) and value heads of 4 of 16 channels in every block."""
    plan = dense_plan(SPEC, 3)
    for block in range(3):
        plan = plan.with_block(
            block,
            BlockPlan(kept_tokens=(0, 1, 2, 5, 6, 9) if block == 0 else None, proj_in=(0, 1, 2, 3, 16, 17, 18, 19)),
        )
    return plan


def test_fresh_model_exports_fp16_with_casts_only_at_the_inputs_and_outputs(tmp_path):
    """A freshly initialised timm model has identical LayerNorm parameters, which the exporter
    shares; the fp16 graph keeps fp32 only at its input and output (2 Casts), passes onnx.checker,
    and holds the fp16 tolerance."""
    model = tiny_vit()  # fresh: every LayerNorm weight 1, bias 0
    for form in ATTENTION_FORMS:
        result = export_plan(
            model, dense_plan(SPEC, 3), tmp_path / f"{form}.onnx", images=IMAGES, precision="fp16", attention=form
        )
        graph = onnx.load(str(result.onnx_path))
        onnx.checker.check_model(graph, full_check=True)
        assert Counter(node.op_type for node in graph.graph.node)["Cast"] == 2
        assert result.report["parity"]["top1_agreement"] >= 0.99


def test_fp32_islands_on_shared_initializers_keep_single_assignment(tmp_path):
    """The converter names one Cast per fp32 consumer after the initializer; shared LayerNorm
    parameters gave two nodes writing one name (onnx.checker: not in SSA form)."""
    model = tiny_vit()
    exported = apply_passes(onnx_from_module(model, IMAGES[:2], tmp_path / "m.onnx", opset=23))
    shared = [
        name
        for name, count in Counter(
            i for n in exported.graph.node if n.op_type == "LayerNormalization" for i in n.input[1:]
        ).items()
        if count > 1
    ]
    assert shared, "the exporter no longer shares equal initializers: this test lost its subject"
    converted = apply_passes(fp16_from_fp32(exported, fp32_ops=("LayerNormalization", "Softmax")), ("toposort",))
    onnx.checker.check_model(converted, full_check=True)


def test_value_heads_are_padded_only_where_the_form_needs_it(tmp_path):
    model = tiny_vit()
    ops = {}
    for form in ATTENTION_FORMS:
        report = export_plan(
            model, _vtp_and_tokens_plan(), tmp_path / f"{form}.onnx", images=IMAGES, attention=form
        ).report
        ops[form] = report["ops"]
        assert report["parity"]["max_abs_diff"] <= 1e-4
    assert (
        ops["attention-op"].get("Pad") == 3 and ops["attention-op"].get("Attention") == 3
    )  # TensorRT's attention needs K and V of one shape
    assert (
        not ops["ort-mha"].get("Pad") and ops["ort-mha"].get("MultiHeadAttention") == 3
    )  # onnxruntime takes narrower values
    assert not ops["matmul-softmax"].get("Pad")


def test_the_form_travels_in_the_onnx_and_the_report(tmp_path):
    result = export_plan(
        tiny_vit(), dense_plan(SPEC, 3), tmp_path / "m.onnx", images=IMAGES, attention="matmul-softmax"
    )
    assert attention_form_of(onnx.load(str(result.onnx_path))) == "matmul-softmax"
    assert result.report["attention_form"] == "matmul-softmax" and result.report["onnx"]["opset"] == 18
    with pytest.raises(ExportError, match="unknown attention form 'fused'"):
        attention_form("fused")


def test_multihead_attention_pass_is_idempotent_and_leaves_what_it_cannot_match(tmp_path):
    model = compact_from_plan(tiny_vit(), dense_plan(SPEC, 3))
    exported = apply_passes(onnx_from_module(model, IMAGES[:2], tmp_path / "m.onnx", opset=23))
    once = apply_passes(exported, ("ort_multihead_attention",))
    twice = apply_passes(once, ("ort_multihead_attention",))
    assert [n.op_type for n in once.graph.node] == [n.op_type for n in twice.graph.node]
    assert Counter(n.op_type for n in once.graph.node)["MultiHeadAttention"] == 3
    normed = compact_from_plan(
        tiny_vit(qk_norm=True), dense_plan(SPEC, 3)
    )  # LayerNorm between the head split and the op: not the pattern
    kept = apply_passes(
        apply_passes(onnx_from_module(normed, IMAGES[:2], tmp_path / "n.onnx", opset=23)), ("ort_multihead_attention",)
    )
    assert Counter(n.op_type for n in kept.graph.node)["Attention"] == 3
