from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from vitslim.pruning.errors import PruningError
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan, load_plan, save_plan, token_counts, validate
from vitslim.pruning.timm_adapter import geometry_of

SPEC = ModelSpec("deit_tiny_patch16_224", {"img_size": 16})


@pytest.fixture(scope="module")
def geometry():
    return geometry_of(tiny_vit())  # depth 3, dim 32, 2 heads of 16, hidden 128, 1 + 16 tokens


def mixed_plan(geometry):
    plan = dense_plan(SPEC, geometry.depth)
    plan = plan.with_block(
        0, BlockPlan(kept_tokens=(0, 2, 3, 9), qkv_in=(1, 5, 7), proj_in=(0, 3, 16, 20), hidden=(4, 8))
    )
    return plan.with_block(
        1, BlockPlan(token_aggregation=torch.rand(2, 3), static_attention=torch.rand(2, 3, 3), fc1_in=(0, 31))
    )


def test_round_trip_keeps_every_field(tmp_path, geometry):
    plan = mixed_plan(geometry)
    validate(plan, geometry)
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path) == plan
    assert json.loads((tmp_path / "plan.json").read_text())["schema_version"] == 1


def test_token_counts_follow_aggregation_and_selection(geometry):
    assert [(c.arriving, c.read, c.written) for c in token_counts(mixed_plan(geometry), geometry)] == [
        (17, 17, 4),
        (4, 3, 3),
        (3, 3, 3),
    ]


@pytest.mark.parametrize(
    "block, message",
    [
        (BlockPlan(kept_tokens=(0, 17)), "block 1 field kept_tokens: index 17 out of range"),
        (BlockPlan(kept_tokens=(0, 3, 3)), "block 1 field kept_tokens: duplicate index 3"),
        (BlockPlan(kept_tokens=(0, 5, 3)), "block 1 field kept_tokens: indices must be in increasing order"),
        (BlockPlan(kept_tokens=(1, 2)), "block 1 field kept_tokens: prefix tokens"),
        (BlockPlan(kept_tokens=()), "block 1 field kept_tokens: keeps nothing"),
        (BlockPlan(qkv_in=(32,)), "block 1 field qkv_in: index 32 out of range"),
        (BlockPlan(hidden=()), "block 1 field hidden: keeps nothing"),
        (BlockPlan(proj_in=(0, 1, 16)), "block 1 field proj_in: heads keep [2, 1] value channels"),
        (BlockPlan(static_attention=torch.rand(2, 17, 16)), "block 1 field static_attention: shape (2, 17, 16)"),
        (
            BlockPlan(static_attention=torch.full((2, 17, 17), float("nan"))),
            "block 1 field static_attention: contains NaN",
        ),
        (
            BlockPlan(token_aggregation=torch.rand(4, 17)),
            "block 1 field token_aggregation: shape (4, 17) must be [M >= 1, 16]",
        ),
    ],
)
def test_validate_names_block_and_field(geometry, block, message):
    plan = dense_plan(SPEC, geometry.depth).with_block(1, block)
    with pytest.raises(PruningError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(plan, geometry)


def test_validate_rejects_wrong_depth(geometry):
    with pytest.raises(PruningError, match="plan has 2 blocks but the model has 3"):
        validate(dense_plan(SPEC, 2), geometry)


def test_validate_rejects_avg_pool_without_patches():
    model = tiny_vit(global_pool="avg")
    plan = dense_plan(SPEC, 3).with_block(2, BlockPlan(kept_tokens=(0,)))
    with pytest.raises(PruningError, match="averages patch tokens"):
        validate(plan, model)


def test_validate_rejects_unsupported_model():
    model = tiny_vit("vit_small_patch16_224", scale_mlp_norm=True)
    with pytest.raises(PruningError, match="block 0: MLP"):
        validate(dense_plan(SPEC, 3), model)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(PruningError, match="plan .* does not exist"):
        load_plan(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(PruningError, match="is unreadable"):
        load_plan(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(PruningError, match="schema version 99"):
        load_plan(tmp_path)
    (tmp_path / "plan.json").write_text(
        json.dumps({"schema_version": 1, "model": {"name": "x"}, "blocks": [{"static_attention": True}]})
    )
    with pytest.raises(PruningError, match="plan tensor blocks.0.static_attention is missing"):
        load_plan(tmp_path)


def test_with_block_returns_new_plan(geometry):
    plan = dense_plan(SPEC, geometry.depth)
    changed = plan.with_block(0, BlockPlan(hidden=(1,)))
    assert plan.blocks[0].is_dense and not changed.blocks[0].is_dense
