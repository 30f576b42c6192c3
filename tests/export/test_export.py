from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vitslim.export.compact import slice_linear
from vitslim.export.errors import ExportError
from vitslim.export.onnx_export import export_plan, run_onnxruntime
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan
from vitslim.pruning.reference import MaskedReference

from vitslim.core.errors import VitslimError
from vitslim.core.precision import Tolerance, compare_outputs

SPEC = ModelSpec("deit_tiny_patch16_224")
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def cls_only_plan(depth: int = 3):
    """Patch-Slimming-like: fewer tokens every block, only the class token out of the last."""
    plan = dense_plan(SPEC, depth).with_block(0, BlockPlan(kept_tokens=(0,) + tuple(range(1, 17, 2))))
    return plan.with_block(1, BlockPlan(kept_tokens=(0, 1, 2, 3))).with_block(2, BlockPlan(kept_tokens=(0,)))


def test_slice_linear_keeps_the_selected_function():
    linear = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    sliced = slice_linear(linear, in_indices=[0, 2, 5], out_indices=[1, 3])
    masked = x * torch.tensor([1.0, 0, 1, 0, 0, 1])
    assert torch.allclose(sliced(x[:, [0, 2, 5]]), linear(masked)[:, [1, 3]], atol=1e-6)


def test_compare_outputs():
    reference = torch.tensor([[1.0, 2.0], [3.0, 1.0]]).numpy()
    parity = compare_outputs(reference, reference + [[0.0, 0.5], [0.0, 3.0]])
    assert parity.max_abs_diff == 3.0 and parity.top1_agreement == 0.5 and parity.batch == 2
    with pytest.raises(VitslimError, match="shapes differ"):
        compare_outputs(reference, reference[:1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_outputs_never_pass(bad):
    """One NaN or Inf logit fails every tolerance, even where argmax still agrees."""
    from vitslim.core.precision import TOLERANCES

    reference = torch.tensor([[1.0, 2.0], [3.0, 1.0]]).numpy()
    candidate = reference.copy()
    candidate[0, 0] = bad
    parity = compare_outputs(reference, candidate)
    assert not any(parity.passes(tolerance) for tolerance in TOLERANCES.values())
    assert compare_outputs(reference, reference).passes(TOLERANCES["fp32"])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_dense_export_report(tmp_path, name):
    model = tiny_vit(name)
    result = export_plan(model, dense_plan(ModelSpec(name), 3), tmp_path / "dense.onnx", images=IMAGES)
    report = json.loads((tmp_path / "dense.report.json").read_text())
    assert {"macs_dense", "macs", "params", "ops", "parity"} <= set(report)
    assert {"max_abs_diff", "cosine", "top1_agreement"} <= set(report["parity"])
    assert report["macs"] == report["macs_dense"] and report["params"] == report["params_dense"]
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["cosine"] > 0.99999
    assert report["onnx"]["io"]["images"] == ["batch", 3, 16, 16]
    assert report["ops"]["Attention"] == 3 and report["attention_form"] == "attention-op"  # the default form
    assert (tmp_path / "dense.report.md").read_text().startswith("# Export report")
    assert result.report == report


def test_token_pruned_export_is_static_and_smaller(tmp_path):
    model = tiny_vit()
    report = export_plan(model, cls_only_plan(), tmp_path / "slim.onnx", images=IMAGES).report
    assert report["macs"] < 0.6 * report["macs_dense"]
    assert report["parity"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(tmp_path / "slim.onnx"))
    gathers = [n for n in graph.graph.node if n.op_type == "Gather"]
    initializers = {i.name for i in graph.graph.initializer}
    constants = {n.output[0] for n in graph.graph.node if n.op_type == "Constant"}
    assert gathers and all(n.input[1] in initializers | constants for n in gathers), (
        "token Gathers must use constant indices"
    )
    for batch in (1, 7):  # batch is dynamic
        images = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = MaskedReference(model, cls_only_plan())(images).numpy()
        assert compare_outputs(expected, run_onnxruntime(tmp_path / "slim.onnx", images.numpy())).max_abs_diff <= 1e-4


def test_static_attention_block_has_no_softmax_or_qk(tmp_path):
    model = tiny_vit()
    plan = dense_plan(SPEC, 3).with_block(0, BlockPlan(static_attention=torch.rand(2, 17, 17).softmax(-1)))
    report = export_plan(model, plan, tmp_path / "static.onnx", images=IMAGES).report
    assert report["ops"]["Attention"] == 2 and "Softmax" not in report["ops"]
    # dynamic blocks: one qkv GEMM (32 -> 96) and proj (32 -> 32); the static block has only v and proj
    shapes = [w["shape"] for w in report["weight_shapes"]]
    assert shapes.count([32, 96]) == 2 and shapes.count([32, 32]) == 2 + 2
    assert [1, 2, 17, 17] in [w["shape"] for w in report["weight_shapes"]] or [2, 17, 17] in [
        w["shape"] for w in report["weight_shapes"]
    ]


def test_channel_pruned_weights_are_physically_smaller(tmp_path):
    model = tiny_vit()
    plan = dense_plan(SPEC, 3).with_block(
        1,
        BlockPlan(
            qkv_in=tuple(range(0, 32, 2)),
            proj_in=(0, 1, 2, 3, 16, 17, 18, 19),
            fc1_in=tuple(range(8)),
            hidden=tuple(range(0, 128, 4)),
        ),
    )
    report = export_plan(model, plan, tmp_path / "vtp.onnx", images=IMAGES).report
    shapes = [w["shape"] for w in report["weight_shapes"]]
    assert [16, 72] in shapes  # one qkv GEMM from 16 of 32 LayerNorm channels: q 32 + k 32 + v 4 per head x 2 heads
    assert shapes.count([8, 32]) == 2  # proj reads the 8 kept value dims; fc1 reads 8 channels into 32 hidden units
    assert [128, 32] in shapes and [32, 32] in shapes  # fc2 dense in other blocks, 32 -> 32 in block 1
    assert report["params"] < report["params_dense"]


def test_parity_failure_leaves_no_file(tmp_path, monkeypatch):
    import vitslim.export.onnx_export as onnx_export

    from vitslim.core.precision import Parity

    def far_off(reference, candidate):  # an export whose outputs differ: what parity must catch
        return Parity(max_abs_diff=1.0, cosine=0.5, top1_agreement=0.0, batch=len(reference))

    monkeypatch.setattr(onnx_export, "compare_outputs", far_off)
    with pytest.raises(ExportError, match="differs from the masked reference"):
        export_plan(tiny_vit(), cls_only_plan(), tmp_path / "bad.onnx", images=IMAGES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), -1.0])
def test_a_tolerance_that_would_pass_everything_is_refused(bound):
    with pytest.raises(VitslimError, match="must be a finite number >= 0"):
        Tolerance(max_abs_diff=bound)


@pytest.mark.slow
def test_dense_deit_small_export(tmp_path):
    import timm

    model = timm.create_model("deit_small_patch16_224").eval()
    report = export_plan(model, dense_plan(ModelSpec("deit_small_patch16_224"), 12), tmp_path / "deit_s.onnx").report
    assert round(report["macs"] / 1e9, 3) == 4.599
    assert report["parity"]["max_abs_diff"] <= 1e-4


@settings(
    max_examples=max(5, settings.default.max_examples // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # each example exports twice
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(0, 16), min_size=3, max_size=3))
def test_slice_layout_matches_reference(tmp_path_factory, seed, sizes):
    """Random nested token sets (Patch-Slimming-like): permutation + Slices == masked reference."""
    generator = torch.Generator().manual_seed(seed)
    model, plan, patches = tiny_vit(), dense_plan(SPEC, 3), list(range(1, 17))
    for block, size in enumerate(sorted(sizes, reverse=True)):
        position = {t: p for p, t in enumerate([0] + patches)}  # positions within this block's input
        patches = sorted(torch.tensor(patches)[torch.randperm(len(patches), generator=generator)[:size]].tolist())
        plan = plan.with_block(block, BlockPlan(kept_tokens=tuple(sorted(position[t] for t in [0] + patches))))
    path = tmp_path_factory.mktemp("slice") / "slice.onnx"
    report = export_plan(model, plan, path, images=IMAGES, token_layout="slice").report
    assert report["parity"]["max_abs_diff"] <= 1e-4
    # one Gather for the permutation, one for the head's class-token pick; token selections are Slices
    assert report["ops"].get("Gather", 0) == 2


def test_fp16_export_runs_every_op_in_fp16(tmp_path):
    """No fp32 islands: LayerNorm and attention read fp16, only the input and output are cast
    (BENCHMARKS.md "fp16 without fp32 islands" has the accuracy with and without them)."""
    from vitslim.pruning.data import digits_splits

    data = digits_splits(3, (16, 16))
    images = torch.stack([data.val[i][0] for i in range(100)])
    report = export_plan(tiny_vit(), cls_only_plan(), tmp_path / "fp16.onnx", images=images, precision="fp16").report
    assert report["precision"] == "fp16" and report["parity"]["top1_agreement"] >= 0.99
    graph = onnx.load(str(tmp_path / "fp16.onnx")).graph
    fp16_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights and graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {
        v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)
    }
    checked = [
        node for node in graph.node if node.op_type in ("LayerNormalization", "Attention") and node.input[0] in dtypes
    ]
    assert checked and all(dtypes[node.input[0]] == onnx.TensorProto.FLOAT16 for node in checked)
    assert [node.op_type for node in graph.node].count("Cast") == 2


def test_dynamic_attention_exports_as_the_chain_tensorrt_fuses(tmp_path):
    """In the matmul-softmax form, every dynamic attention (full, with cut queries, with narrower
    VTP value heads) is MatMul -> Softmax -> MatMul: the pattern older TensorRT fuses."""
    model = tiny_vit()
    plan = dense_plan(SPEC, 3).with_block(
        1, BlockPlan(kept_tokens=(0, 1, 2, 3, 7), proj_in=(0, 1, 2, 3, 16, 17, 18, 19))
    )
    plan = plan.with_block(2, BlockPlan(proj_in=tuple(c for c in range(32) if c % 16 < 8)))
    export_plan(model, plan, tmp_path / "m.onnx", images=IMAGES, attention="matmul-softmax")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    producer = {output: node for node in graph.node for output in node.output}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == 3
    for softmax in softmaxes:
        consumers = [node.op_type for node in graph.node if softmax.output[0] in node.input]
        assert producer[softmax.input[0]].op_type == "MatMul" and consumers == ["MatMul"]


def test_masked_channel_layout_has_no_channel_gathers_and_keeps_parity(tmp_path):
    """The masked layout reads pruned LayerNorm outputs through zero weight columns: no Gather,
    full-width qkv and fc1, the same function."""
    model = tiny_vit()
    plan = dense_plan(SPEC, 3).with_block(
        1, BlockPlan(qkv_in=tuple(range(0, 32, 2)), fc1_in=tuple(range(8)), hidden=tuple(range(0, 128, 4)))
    )
    gathered = export_plan(model, plan, tmp_path / "gather.onnx", images=IMAGES).report
    masked = export_plan(model, plan, tmp_path / "masked.onnx", images=IMAGES, channel_layout="masked").report
    assert gathered["ops"].get("Gather", 0) - masked["ops"].get("Gather", 0) == 2
    assert [w["shape"] for w in masked["weight_shapes"]].count([32, 96]) == 3  # block 1's qkv reads all 32 channels
    assert [16, 96] in [w["shape"] for w in gathered["weight_shapes"]]
    assert (
        masked["parity"]["max_abs_diff"] <= 1e-4 and masked["macs"] == gathered["macs"]
    )  # the plan's MACs, not the zeros'
