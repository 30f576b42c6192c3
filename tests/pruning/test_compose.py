"""Methods compose: VTP narrows channels, Patch Slimming and DGSSA + GLAD change tokens and
attention; each starts from the other kind's result, works on the model under that start plan,
keeps what the start decided, and is held to the masked reference of the whole plan."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_vit
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.data import digits_splits
from vitslim.pruning.errors import PruningError
from vitslim.pruning.methods.base import start
from vitslim.pruning.methods.dgssa_glad import DGSSAGladConfig, analyse_attention, glad_plan
from vitslim.pruning.methods.patch_slimming import PatchSlimConfig, _teacher_features, plan_from_token_sets
from vitslim.pruning.methods.vtp import GatedModel, VTPConfig, VTPGates, plan_from_gates
from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan, dense_plan
from vitslim.pruning.reference import MaskedReference, plan_applied, recorded_attention
from vitslim.pruning.timm_adapter import CHANNEL_SPACES, geometry_of

from vitslim.api import prune

MODEL = tiny_vit(num_classes=10)
GEOMETRY = geometry_of(MODEL)  # 3 blocks, dim 32, 2 heads of 16, hidden 128, 16 patches + the class token
DENSE = dense_plan(ModelSpec("tiny"), 3)
DATA = digits_splits(3, (16, 16))
IMAGES = torch.stack([DATA.val[i][0] for i in range(4)])
# A start as VTP leaves one: every block narrower on both sides, the same value width per head.
WIDTHS = SlimPlan(
    model=DENSE.model,
    blocks=tuple(
        BlockPlan(
            qkv_in=tuple(range(0, 32, 2)),
            proj_in=tuple(range(8)) + tuple(range(16, 24)),
            fc1_in=tuple(range(1, 32, 2)),
            hidden=tuple(range(0, 128, 3)),
        )
        for _ in range(3)
    ),
    method="vtp",
)
# A start as Patch Slimming leaves one: nested token sets, the last block the class token alone.
TOKENS = plan_from_token_sets([tuple(range(17)), (0, 2, 5, 7, 11), (0,)], DENSE, 17)
# A start as DGSSA + GLAD leaves one: static attention in block 0, patches pooled to 4 before block 2.
STATIC = glad_plan(DENSE, {0: torch.full((2, 17, 17), 1 / 17)}, {2: torch.full((4, 16), 1 / 4)})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def test_each_method_keeps_what_its_start_decided():
    tokens = plan_from_token_sets([tuple(range(17)), (0, 3, 9), (0,)], WIDTHS, 17)
    glad = glad_plan(WIDTHS, {0: torch.full((2, 17, 17), 1 / 17)}, {2: torch.full((4, 16), 1 / 4)})
    for plan in (tokens, glad):
        assert all(getattr(b, s) == getattr(w, s) for b, w in zip(plan.blocks, WIDTHS.blocks) for s in CHANNEL_SPACES)
    assert tokens.blocks[1].kept_tokens == (0, 3, 9) and tokens.method == "vtp+patch-slim"
    assert glad.blocks[0].static_attention is not None and glad.method == "vtp+dgssa-glad"
    gates = VTPGates(GEOMETRY).as_dict()
    for start_plan in (TOKENS, STATIC):
        widths = plan_from_gates(gates, GEOMETRY, start_plan, VTPConfig(round_to=8), 0.4)
        assert widths.method == f"{start_plan.method}+vtp"
        for block, before in zip(widths.blocks, start_plan.blocks):
            assert block.kept_tokens == before.kept_tokens
            assert (block.static_attention is None) == (before.static_attention is None)
            assert (block.token_aggregation is None) == (before.token_aggregation is None)
        assert any(block.hidden is not None for block in widths.blocks)
    assert plan_from_token_sets([tuple(range(17)), (0, 3), (0,)], DENSE, 17).method == "patch-slim"


def test_vtp_trains_its_gates_under_the_start_plan():
    """Gates of one are the start model; gates that zero dims are the composed plan's reference."""
    gates = VTPGates(GEOMETRY)
    torch.testing.assert_close(
        _logits(GatedModel(MODEL, TOKENS, gates)), _logits(MaskedReference(MODEL, TOKENS)), atol=1e-6, rtol=0
    )
    plan = plan_from_gates(gates.as_dict(), GEOMETRY, TOKENS, VTPConfig(round_to=8), 0.4)
    with torch.no_grad():
        for (index, space), gate in gates.as_dict().items():
            kept = getattr(plan.blocks[index], space)
            if kept is not None:
                gate.zero_()[list(kept)] = 1
    torch.testing.assert_close(
        _logits(GatedModel(MODEL, TOKENS, gates)), _logits(MaskedReference(MODEL, plan)), atol=1e-6, rtol=0
    )


def test_patch_slimming_reconstructs_the_start_model():
    """The teacher's features are the start model's: its last block, through the head, gives the
    start model's logits (not the dense model's)."""
    start_model = MaskedReference(MODEL, WIDTHS)
    features = _teacher_features(start_model, IMAGES, batch_size=3)
    with torch.no_grad():
        logits = MODEL.forward_head(MODEL.norm(features.outputs[-1]))
    torch.testing.assert_close(logits, _logits(start_model), atol=1e-5, rtol=0)
    assert not torch.allclose(logits, _logits(MODEL), atol=1e-3)


def test_dgssa_glad_analyses_the_start_model():
    _, means = analyse_attention(MaskedReference(MODEL, WIDTHS), IMAGES, batch_size=3)
    with torch.no_grad(), plan_applied(MODEL, WIDTHS), recorded_attention(MODEL) as records:
        MODEL(IMAGES)
    torch.testing.assert_close(means[1], records[1]["attention"].mean(dim=0), atol=1e-6, rtol=0)
    _, dense_means = analyse_attention(MaskedReference(MODEL, DENSE), IMAGES, batch_size=3)
    assert not torch.allclose(means[1], dense_means[1], atol=1e-4)


@pytest.mark.parametrize(
    ("method", "start_plan", "message"),
    [
        ("vtp", WIDTHS, "VTP cannot start from a plan that already sets qkv_in (block 0, method vtp)"),
        ("patch-slim", TOKENS, "Patch Slimming cannot start from a plan that already sets kept_tokens (block 1"),
        ("patch-slim", STATIC, "Patch Slimming cannot start from a plan that already sets static_attention"),
        ("dgssa-glad", TOKENS, "DGSSA + GLAD cannot start from a plan that already sets kept_tokens"),
    ],
)
def test_a_method_refuses_a_start_on_its_own_axis(method, start_plan, message):
    with pytest.raises(PruningError, match=re.escape(message)) as raised:
        start(MODEL, start_plan, method)
    assert "start it from the dense run or from" in str(raised.value)


FAST = {
    "vtp": VTPConfig(prune_ratio=0.4, sparsity_epochs=1, finetune_epochs=0, round_to=8),
    "patch-slim": PatchSlimConfig(
        epsilon=0.05, step=4, block_epochs=1, finetune_epochs=1, calibration_images=64, block_tuning_images=64
    ),
    "dgssa-glad": DGSSAGladConfig(
        static_blocks=1, pyramid="2:4", finetune_epochs=1, calibration_images=64, batch_size=32
    ),
}


@pytest.mark.parametrize(
    ("first", "second"), [("vtp", "patch-slim"), ("vtp", "dgssa-glad"), ("patch-slim", "vtp"), ("dgssa-glad", "vtp")]
)
def test_a_composed_run_cuts_both_axes_and_exports_with_parity(first, second, tmp_path):
    model = tiny_vit(num_classes=10)
    model.vitslim_spec = DENSE.model  # as vitslim.load_model leaves it
    before = prune(model, DATA, first, **vars(FAST[first]))
    after = prune(before.model, DATA, second, start=before.plan, **vars(FAST[second]))
    assert after.plan.method == f"{first}+{second}" and after.report["plan_method"] == after.plan.method
    widths, tokens = (before.plan, after.plan) if first == "vtp" else (after.plan, before.plan)
    for block, narrow, token in zip(after.plan.blocks, widths.blocks, tokens.blocks):
        assert all(getattr(block, s) == getattr(narrow, s) for s in CHANNEL_SPACES)
        assert block.kept_tokens == token.kept_tokens
        assert (block.static_attention is None) == (token.static_attention is None)
    start_report = after.report["start"]
    assert start_report == {"method": first, "macs": before.report["macs"], "params": before.report["params"]}
    assert after.report["macs"] < start_report["macs"] and after.report["macs_dense"] == before.report["macs_dense"]
    # the start model is the first run's result as it left it
    assert after.report["top1_start"] == pytest.approx(before.report["top1"])
    exported = export_plan(after.model, after.plan, tmp_path / "composed.onnx", images=IMAGES).report
    assert exported["parity"]["max_abs_diff"] <= 1e-4 and exported["macs"] == after.report["macs"]
