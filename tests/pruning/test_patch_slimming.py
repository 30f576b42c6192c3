from __future__ import annotations

import onnx
import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.data import digits_splits
from vitslim.pruning.errors import PruningError
from vitslim.pruning.macs import plan_macs
from vitslim.pruning.methods.patch_slimming import (
    PatchSlimConfig,
    feature_energy,
    path_energy,
    path_energy_brute_force,
    plan_from_token_sets,
    prune_patch_slimming,
    ranked_candidates,
)
from vitslim.pruning.plan import ModelSpec, dense_plan, validate
from vitslim.pruning.timm_adapter import geometry_of

DATA = digits_splits(3, (16, 16))
FAST = dict(step=4, block_epochs=1, finetune_epochs=0, calibration_images=64, block_tuning_images=64, batch_size=32)


def random_attention(generator, batch, heads, rows, cols):
    return torch.rand(batch, heads, rows, cols, generator=generator).softmax(-1)


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.integers(1, 3), sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4))
def test_score_recursion_equals_brute_force(seed, heads, sizes):
    """sizes = token counts from block t+1's input down to the last block's output."""
    generator = torch.Generator().manual_seed(seed)
    attentions = [random_attention(generator, 2, heads, n_out, n_in).double() for n_in, n_out in zip(sizes, sizes[1:])]
    torch.testing.assert_close(path_energy(attentions), path_energy_brute_force(attentions))


def test_feature_energy_shape_and_value():
    attention = torch.eye(3).expand(1, 2, 3, 3)
    block_input = torch.tensor([[[1.0, -2.0], [0.0, 3.0], [1.0, 1.0]]])
    torch.testing.assert_close(feature_energy(attention, block_input), torch.tensor([[10.0, 18.0, 4.0]]))


def test_token_sets_become_nested_positions():
    base = dense_plan(ModelSpec("tiny"), 3)
    plan = plan_from_token_sets([tuple(range(17)), (0, 3, 5, 9), (0, 9)], base, 17)
    assert plan.blocks[0].kept_tokens is None
    assert plan.blocks[1].kept_tokens == (0, 3, 5, 9) and plan.blocks[2].kept_tokens == (0, 3)
    assert all(b.is_dense for b in plan_from_token_sets([tuple(range(17))] * 3, base, 17).blocks)
    assert ranked_candidates(torch.tensor([9.0, 1, 5, 3]), kept=(0, 2), num_prefix=1) == [3, 1]


def check_search_result(model, result):
    geometry = geometry_of(model)
    validate(result.plan, model)
    sets = result.report["token_sets"]
    prefix = tuple(range(geometry.num_prefix_tokens))
    assert tuple(sets[-1]) == prefix, "the last block outputs only the prefix tokens"
    report = result.report
    assert not set(report["calibration_indices"]) & set(report["block_tuning_indices"]), (
        "ε is checked on images the block tuning never saw"
    )
    for upper, lower in zip(sets[1:], sets[:-1]):
        assert set(upper) <= set(lower), "masks must be nested"
    assert all(tuple(s[: len(prefix)]) == prefix for s in sets), "prefix tokens are kept everywhere"
    return geometry


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_small_patch16_224", {"reg_tokens": 2}),
    ],
)
def test_search_nests_masks_and_keeps_prefix_tokens(tmp_path, name, overrides):
    model = tiny_vit(name, num_classes=10, **overrides)
    result = prune_patch_slimming(model, DATA, PatchSlimConfig(epsilon=0.05, **FAST), dense_plan(ModelSpec(name), 3))
    geometry = check_search_result(model, result)
    report = export_plan(
        result.model, result.plan, tmp_path / "ps.onnx", images=torch.stack([DATA.val[i][0] for i in range(4)])
    ).report
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["macs"] < report["macs_dense"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ps.onnx")).graph.node}
    assert not ops & {"TopK", "NonZero", "ScatterElements", "ScatterND", "GatherElements", "Where", "ArgMax"}
    assert geometry.num_prefix_tokens == {"deit_tiny_patch16_224": 1, "deit_tiny_distilled_patch16_224": 2}.get(name, 3)


def test_target_macs_is_met():
    model = tiny_vit(num_classes=10)
    geometry = geometry_of(model)
    base = dense_plan(ModelSpec("tiny"), 3)
    result = prune_patch_slimming(model, DATA, PatchSlimConfig(target_macs=0.6, search_iterations=4, **FAST), base)
    check_search_result(model, result)
    assert plan_macs(result.plan, geometry)["total"] <= 0.6 * plan_macs(base, geometry)["total"]


def test_model_is_not_modified():
    model = tiny_vit(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_patch_slimming(model, DATA, PatchSlimConfig(epsilon=0.05, **FAST), dense_plan(ModelSpec("tiny"), 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": 0.0}, "--epsilon 0.0 must be > 0"),
        ({"epsilon": -1.0}, "--epsilon -1.0 must be > 0"),
        ({"target_macs": 0.0}, "--target-macs 0.0 must be in \\(0, 1\\]"),
        ({"target_macs": 1.5}, "--target-macs 1.5 must be in \\(0, 1\\]"),
        ({}, "exactly one of --epsilon"),
        ({"epsilon": 0.1, "target_macs": 0.5}, "exactly one of --epsilon"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(PruningError, match=message):
        PatchSlimConfig(**kwargs)


def test_more_calibration_images_than_training_data_is_refused():
    with pytest.raises(PruningError, match="lower --calibration-images / --block-tuning-images"):
        prune_patch_slimming(
            tiny_vit(num_classes=10),
            DATA,
            PatchSlimConfig(epsilon=0.02, calibration_images=1000, block_tuning_images=1000),
            dense_plan(ModelSpec("tiny"), 3),
        )


@pytest.mark.parametrize("overrides", [{"global_pool": "avg"}, {"global_pool": "avg", "class_token": False}])
def test_average_pooled_and_class_token_free_models_are_refused_with_the_reason(overrides):
    with pytest.raises(PruningError, match="needs a class-token head.*global_pool='token'"):
        prune_patch_slimming(
            tiny_vit(num_classes=10, **overrides),
            DATA,
            PatchSlimConfig(epsilon=0.05, **FAST),
            dense_plan(ModelSpec("tiny", overrides), 3),
        )


@pytest.mark.slow
def test_deit_small_distilled_keeps_both_prefix_tokens():
    """The real deit_small_distilled_patch16_224 architecture (class + distillation token), at
    64x64 input (16 patches) with random weights, so that the search runs on the CPU."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_distilled_patch16_224", img_size=64, num_classes=10).eval()
    data = digits_splits(3, (64, 64))
    config = PatchSlimConfig(
        epsilon=0.05,
        step=8,
        block_epochs=1,
        finetune_epochs=0,
        calibration_images=32,
        block_tuning_images=32,
        batch_size=32,
    )
    result = prune_patch_slimming(
        model, data, config, dense_plan(ModelSpec("deit_small_distilled_patch16_224", {"img_size": 64}), 12)
    )
    check_search_result(model, result)
    assert result.report["token_sets"][-1] == [0, 1]
