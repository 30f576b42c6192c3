"""The GPU latency study's structures (what it times; its speed is measured on the device, not here)."""
from __future__ import annotations

from conftest import tiny_vit
from vitslim.latency_study import structure_plans
from vitslim.pruning.macs import kept_channels, plan_macs
from vitslim.pruning.plan import ModelSpec, dense_plan, validate
from vitslim.pruning.timm_adapter import geometry_of


def test_structures_are_valid_cheaper_and_vtp_is_hidden_heavy():
    model = tiny_vit(depth=6, embed_dim=64)
    geometry = geometry_of(model)
    dense_macs = plan_macs(dense_plan(ModelSpec("tiny"), geometry.depth), geometry)["total"]
    plans = structure_plans(model, ModelSpec("tiny"))
    assert {"dense plan", "vtp 40% round 8", "vtp 40% round 8 masked", "patch-slim gather", "patch-slim slice", "dgssa-glad"} <= set(plans)
    for name, (plan, layout) in plans.items():
        validate(plan, geometry)
        fraction = plan_macs(plan, geometry)["total"] / dense_macs
        assert fraction == 1.0 if name == "dense plan" else fraction < 0.9, name
    vtp, _ = plans["vtp 40% round 8"]
    kept = [kept_channels(block, geometry) for block in vtp.blocks]
    hidden_cut = sum(geometry.mlp_hidden - k["hidden"] for k in kept)
    other_cut = sum(geometry.channel_sizes[s] - k[s] for k in kept for s in ("qkv_in", "proj_in", "fc1_in"))
    assert hidden_cut > 3 * other_cut  # a trained VTP run prunes mostly MLP hidden units
