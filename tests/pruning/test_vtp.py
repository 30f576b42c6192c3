from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.errors import PruningError
from vitslim.pruning.macs import plan_macs
from vitslim.pruning.methods.vtp import (
    GatedModel,
    VTPConfig,
    VTPGates,
    constrained_count,
    fold_gates,
    kept_counts,
    kept_magnitude,
    plan_from_gates,
    pruned_fraction,
    ranking_scores,
)
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan
from vitslim.pruning.reference import MaskedReference
from vitslim.pruning.timm_adapter import CHANNEL_SPACES, block_parts, count_params, geometry_of

MODEL = tiny_vit()
GEOMETRY = geometry_of(MODEL)  # 3 blocks, dim 32, 2 heads of 16, hidden 128
BASE = dense_plan(ModelSpec("tiny"), 3)
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def random_gates(seed: int) -> VTPGates:
    gates = VTPGates(GEOMETRY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates.values:
            gate.copy_(torch.rand(gate.shape, generator=generator) * 2 - 0.5)
    return gates


@pytest.mark.parametrize("space", CHANNEL_SPACES)
def test_a_zero_gate_removes_the_same_dim_as_the_plan(space):
    """Gate placement: zeroing gate j of a space == the plan dropping index j of that space."""
    gates = VTPGates(GEOMETRY)
    size = gates.as_dict()[(1, space)].numel()
    with torch.no_grad():
        gates.as_dict()[(1, space)][5] = 0.0
    kept = tuple(i for i in range(size) if i != 5) if space != "proj_in" else None
    if space == "proj_in":  # the plan needs equal value widths per head: drop dim 5 of head 0 and 5 of head 1
        with torch.no_grad():
            gates.as_dict()[(1, space)][16 + 5] = 0.0
        kept = tuple(i for i in range(size) if i not in (5, 21))
    plan = BASE.with_block(1, BlockPlan(**{space: kept}))
    with torch.no_grad():
        assert torch.allclose(GatedModel(MODEL, BASE, gates)(IMAGES), MaskedReference(MODEL, plan)(IMAGES), atol=1e-6)


def test_gates_multiply_the_inputs_of_qkv_proj_fc1_fc2():
    gates = VTPGates(GEOMETRY)
    with torch.no_grad():
        for gate in gates.values:
            gate.fill_(0.5)
    doubled = copy.deepcopy(MODEL)
    with torch.no_grad():
        for block in doubled.blocks:
            for space in CHANNEL_SPACES:
                block_parts(block).reader_of(space).weight.mul_(0.5)
        assert torch.allclose(GatedModel(MODEL, BASE, gates)(IMAGES), doubled(IMAGES), atol=1e-5)


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0.05, 0.95), per_module=st.booleans())
def test_threshold_removes_the_requested_fraction(seed, ratio, per_module):
    scores = ranking_scores(random_gates(seed).as_dict(), seed)
    counts = kept_counts(scores, ratio, per_module)
    total = sum(s.numel() for s in scores.values())
    removed = total - sum(counts.values())
    assert abs(removed - ratio * total) <= (len(scores) if per_module else 1)
    plan = plan_from_gates(
        random_gates(seed).as_dict(),
        GEOMETRY,
        BASE,
        VTPConfig(prune_ratio=ratio, per_module=per_module, seed=seed, round_to=1),
    )
    # after making value widths equal per head: still within 1 dim per module
    assert abs(pruned_fraction(plan, GEOMETRY) * total - ratio * total) <= len(scores)


def test_global_threshold_prunes_the_smallest_gates():
    gates = VTPGates(GEOMETRY)
    with torch.no_grad():
        gates.as_dict()[(2, "hidden")][:40] = 0.01  # the 40 smallest of all gates
    plan = plan_from_gates(gates.as_dict(), GEOMETRY, BASE, VTPConfig(prune_ratio=40 / (3 * (32 + 32 + 32 + 128))))
    assert plan.blocks[2].hidden == tuple(range(40, 128))
    assert all(b.is_dense for b in plan.blocks[:2])


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0.1, 0.9))
def test_folding_preserves_the_gated_function(seed, ratio):
    """Gated model with the pruned gates at zero == masked reference of the folded weights (≤ 1e-5)."""
    gates = random_gates(seed)
    plan = plan_from_gates(gates.as_dict(), GEOMETRY, BASE, VTPConfig(prune_ratio=ratio, seed=seed))
    with torch.no_grad():
        for (block, space), gate in gates.as_dict().items():
            kept = getattr(plan.blocks[block], space)
            if kept is not None:
                mask = torch.zeros_like(gate)
                mask[list(kept)] = 1
                gate.mul_(mask)
        gated = GatedModel(MODEL, BASE, gates)(IMAGES)
        folded = MaskedReference(fold_gates(MODEL, gates.as_dict()), plan)(IMAGES)
    assert (gated - folded).abs().max().item() <= 1e-5


def test_kept_magnitude_sums_the_gates_of_the_dims_a_plan_keeps():
    """The proxy VTP's latency search compares across roundings: Σ|gate| over the kept dims only."""
    gates = random_gates(5).as_dict()
    with torch.no_grad():
        gates[(1, "hidden")][:4] = torch.tensor([-3.0, 2.0, 0.5, 7.0])
    every = sum(float(gate.detach().abs().sum()) for gate in gates.values())
    assert kept_magnitude(gates, BASE) == pytest.approx(every)
    dropped = BASE.with_block(1, BlockPlan(hidden=tuple(range(1, 128))))  # drops the gate at -3
    assert kept_magnitude(gates, dropped) == pytest.approx(every - 3.0)
    less, more = (plan_from_gates(gates, GEOMETRY, BASE, VTPConfig(prune_ratio=r)) for r in (0.3, 0.6))
    assert every > kept_magnitude(gates, less) > kept_magnitude(gates, more)


@pytest.mark.parametrize("round_to", [1, 8])
def test_rounding_is_honoured(round_to):
    plan = plan_from_gates(random_gates(3).as_dict(), GEOMETRY, BASE, VTPConfig(prune_ratio=0.5, round_to=round_to))
    for block in plan.blocks:
        for space in ("qkv_in", "fc1_in", "hidden"):
            kept = getattr(block, space)
            assert kept is None or len(kept) % round_to == 0
        if block.proj_in is not None:
            per_head = [sum(1 for c in block.proj_in if c // 16 == h) for h in range(2)]
            assert per_head[0] == per_head[1] and per_head[0] % round_to == 0
    assert constrained_count("proj_in", 13, GEOMETRY, 8) == 16 and constrained_count("hidden", 3, GEOMETRY, 8) == 8


def test_vtp_export_is_physically_smaller_with_no_gates(tmp_path):
    gates = random_gates(7)
    plan = plan_from_gates(gates.as_dict(), GEOMETRY, BASE, VTPConfig(prune_ratio=0.4))
    folded = fold_gates(MODEL, gates.as_dict())
    slim = export_plan(folded, plan, tmp_path / "vtp.onnx", images=IMAGES).report
    dense = export_plan(MODEL, BASE, tmp_path / "dense.onnx", images=IMAGES).report
    assert slim["parity"]["max_abs_diff"] <= 1e-4
    assert slim["params"] < dense["params"] and slim["macs"] < dense["macs"]
    assert slim["ops"].get("Mul", 0) == dense["ops"].get("Mul", 0), "no gate multiplication may remain"
    assert slim["ops"]["Gather"] > dense["ops"].get("Gather", 0)  # channel selection after LayerNorm


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prune_ratio": 0.0}, "must be in \\(0, 1\\)"),
        ({"prune_ratio": 1.0}, "must be in \\(0, 1\\)"),
        ({"l1": -1e-4}, "--l1 -0.0001 must be >= 0"),
        ({"round_to": 0}, "--round-to 0"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(PruningError, match=message):
        VTPConfig(**kwargs)


def test_deit_base_structure_at_40_percent():
    """Random weights (all gates equal): the structure that a uniform 40 % cut (no rounding) gives DeiT-B."""
    import timm

    model = timm.create_model("deit_base_patch16_224")
    geometry = geometry_of(model)
    plan = plan_from_gates(
        VTPGates(geometry).as_dict(),
        geometry,
        dense_plan(ModelSpec("deit_base_patch16_224"), 12),
        VTPConfig(prune_ratio=0.4, round_to=1),
    )
    from vitslim.export.compact import compact_from_plan

    assert abs(pruned_fraction(plan, geometry) - 0.4) < 0.001
    assert 43e6 < count_params(compact_from_plan(model, plan)) < 45e6  # paper: about 48 M (see docs/methods.md)
    assert 8.9e9 < plan_macs(plan, geometry)["total"] < 9.2e9  # paper: about 10.0 G
