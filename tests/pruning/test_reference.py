from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan
from vitslim.pruning.reference import MaskedReference, plan_applied
from vitslim.pruning.timm_adapter import geometry_of

SPEC = ModelSpec("tiny")
IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),  # class + distillation token
        ("vit_small_patch16_224", {"reg_tokens": 4, "class_token": True}),  # register tokens
        ("vit_small_patch16_224", {"global_pool": "avg", "class_token": False, "img_size": 24, "patch_size": 6}),
        ("vit_small_patch16_224", {"init_values": 1e-2, "qk_norm": True}),  # layer scale, q/k norm
    ],
)
def test_dense_plan_is_the_dense_model(name, overrides):
    model = tiny_vit(name, **overrides)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(MaskedReference(model, dense_plan(SPEC, len(model.blocks)))(images), model(images))


def test_kept_tokens_select_rows_of_the_dense_block():
    model = tiny_vit()
    kept = (0, 4, 9)
    plan = dense_plan(SPEC, 3).with_block(0, BlockPlan(kept_tokens=kept))
    captured = {}
    model.blocks[1].register_forward_pre_hook(lambda module, args: captured.setdefault("next_input", args[0]))
    with torch.no_grad():
        model(IMAGES)
        dense_rows = captured.pop("next_input")[:, list(kept)]
        with plan_applied(model, plan):
            model(IMAGES)
    assert torch.allclose(captured["next_input"], dense_rows, atol=1e-6)


def test_static_attention_equal_to_dynamic_reproduces_the_block():
    """A static matrix equal to the attention of a fixed input gives the dense output on that input."""
    model = tiny_vit()
    image = IMAGES[:1]
    probs = {}
    block = model.blocks[1]
    block.attn.fused_attn = False
    handle = block.attn.attn_drop.register_forward_hook(lambda m, a, out: probs.setdefault("p", out[0].clone()))
    with torch.no_grad():
        dense = model(image)
    handle.remove()
    plan = dense_plan(SPEC, 3).with_block(1, BlockPlan(static_attention=probs["p"]))
    with torch.no_grad():
        assert torch.allclose(MaskedReference(model, plan)(image), dense, atol=1e-5)


def test_identity_aggregation_is_the_dense_model():
    model = tiny_vit()
    geometry = geometry_of(model)
    plan = dense_plan(SPEC, 3).with_block(1, BlockPlan(token_aggregation=torch.eye(geometry.num_patches)))
    with torch.no_grad():
        assert torch.allclose(MaskedReference(model, plan)(IMAGES), model(IMAGES), atol=1e-5)


def test_hooks_are_removed_after_the_context():
    model = tiny_vit()
    plan = dense_plan(SPEC, 3).with_block(0, BlockPlan(hidden=(0,), static_attention=torch.rand(2, 17, 17)))
    with torch.no_grad():
        before = model(IMAGES)
        MaskedReference(model, plan)(IMAGES)
        assert torch.equal(model(IMAGES), before)
    assert model.blocks[0].attn.fused_attn == tiny_vit().blocks[0].attn.fused_attn


def test_masks_change_the_output():
    """Guard against hooks that silently do nothing."""
    model = tiny_vit()
    peaked = torch.zeros(2, 17, 17)
    peaked[:, :, 3] = 1.0
    for field, value in (
        ("qkv_in", (0,)),
        ("proj_in", (0, 16)),
        ("fc1_in", (3,)),
        ("hidden", (5,)),
        ("static_attention", peaked),
    ):
        plan = dense_plan(SPEC, 3).with_block(0, BlockPlan(**{field: value}))
        with torch.no_grad():
            assert not torch.allclose(MaskedReference(model, plan)(IMAGES), model(IMAGES), atol=1e-4), field
