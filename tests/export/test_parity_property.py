"""Compact module and exported ONNX against the masked reference on random valid plans."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from plans import random_plans
from vitslim.export.attention_form import ATTENTION_FORMS
from vitslim.export.compact import CHANNEL_LAYOUTS, compact_from_plan
from vitslim.export.onnx_export import export_plan, run_onnxruntime
from vitslim.pruning.reference import MaskedReference
from vitslim.pruning.timm_adapter import geometry_of

MODEL = tiny_vit()
GEOMETRY = geometry_of(MODEL)
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
DYNAMIC_INDEX_OPS = {"TopK", "NonZero", "ScatterElements", "ScatterND", "GatherElements", "Where", "ArgMax"}


@pytest.mark.parametrize("pad_value_heads", [False, True])
@pytest.mark.parametrize("channel_layout", CHANNEL_LAYOUTS)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=random_plans(GEOMETRY))
def test_compact_module_matches_reference(channel_layout, pad_value_heads, plan):
    with torch.no_grad():
        expected = MaskedReference(MODEL, plan)(IMAGES)
        actual = compact_from_plan(MODEL, plan, channel_layout=channel_layout, pad_value_heads=pad_value_heads)(IMAGES)
    assert (expected - actual).abs().max().item() <= 1e-4


# ops that hold each form's attention; the other forms' ops must be absent
FORM_OPS = {"attention-op": "Attention", "matmul-softmax": "Softmax", "ort-mha": "MultiHeadAttention"}


@pytest.mark.parametrize("form", ATTENTION_FORMS)
@settings(
    deadline=None, max_examples=5, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(plan=random_plans(GEOMETRY))
def test_onnx_matches_reference(form, plan, tmp_path_factory):
    """Every attention form on random plans (rectangular queries, narrower value heads, static
    attention, aggregation in any mix): the masked reference's function, one attention node of
    the form per block with dynamic attention, and no other form's."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_plan(MODEL, plan, path, images=IMAGES, attention=form)
    assert result.report["parity"]["max_abs_diff"] <= 1e-4
    assert result.report["parity"]["top1_agreement"] == 1.0
    assert result.report["attention_form"] == form and result.report["onnx"]["opset"] == ATTENTION_FORMS[form].opset
    graph = onnx.load(str(path))
    ops = [node.op_type for node in graph.graph.node]
    assert not DYNAMIC_INDEX_OPS & set(ops)
    dynamic = sum(block.static_attention is None for block in plan.blocks)
    assert ops.count(FORM_OPS[form]) == dynamic
    assert not {op for name, op in FORM_OPS.items() if name != form} & set(ops)
    # batch is dynamic: another batch size runs and still matches
    with torch.no_grad():
        expected = MaskedReference(MODEL, plan)(IMAGES[:3]).numpy()
    np.testing.assert_allclose(run_onnxruntime(path, IMAGES[:3].numpy()), expected, atol=1e-4, rtol=0)


@pytest.mark.gpu
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=random_plans(GEOMETRY))
def test_compact_module_on_cuda_matches_reference(plan):
    """The fused (SDPA) attention kernels on a GPU compute the reference's function: fp32 with TF32
    off within 1e-4, fp16 with the same top-1 on every image."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        expected = MaskedReference(MODEL, plan)(IMAGES)
        compact = compact_from_plan(MODEL, plan).cuda()
        fp32 = compact(IMAGES.cuda()).cpu()
        fp16 = compact.half()(IMAGES.cuda().half()).float().cpu()
    assert (expected - fp32).abs().max().item() <= 1e-4
    assert torch.equal(expected.argmax(-1), fp16.argmax(-1)) or (expected - fp16).abs().max().item() < 5e-2
