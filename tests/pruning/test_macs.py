from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from plans import random_plans
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from vitslim.export.compact import compact_from_plan
from vitslim.pruning.macs import plan_macs
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan
from vitslim.pruning.timm_adapter import geometry_of

MODEL = tiny_vit()
GEOMETRY = geometry_of(MODEL)


def counted_macs(module: torch.nn.Module, input_shape) -> float:
    # The math backend of scaled_dot_product_attention: the flop counter does not count the CPU
    # flash kernel that SDPA picks when query and value heads are equally wide.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(torch.randn(1, *input_shape))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize(
    "name, gmacs",
    [("deit_tiny_patch16_224", 1.254), ("deit_small_patch16_224", 4.599), ("deit_base_patch16_224", 17.564)],
)
def test_dense_deit_macs(name, gmacs):
    with torch.device("meta"):
        geometry = geometry_of(timm.create_model(name))
    assert round(plan_macs(dense_plan(ModelSpec(name), 12), geometry)["total"] / 1e9, 3) == gmacs


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=random_plans(GEOMETRY))
def test_analytic_macs_match_flop_counter(plan):
    analytic = plan_macs(plan, GEOMETRY)["total"]
    counted = counted_macs(compact_from_plan(MODEL, plan), (3, 16, 16))
    assert abs(analytic - counted) <= 0.01 * counted


def test_rectangular_and_static_blocks_cost_less():
    dense = plan_macs(dense_plan(ModelSpec("tiny"), 3), GEOMETRY)
    cls_only = plan_macs(dense_plan(ModelSpec("tiny"), 3).with_block(2, BlockPlan(kept_tokens=(0,))), GEOMETRY)
    static = plan_macs(
        dense_plan(ModelSpec("tiny"), 3).with_block(0, BlockPlan(static_attention=torch.rand(2, 17, 17))), GEOMETRY
    )
    n, d = GEOMETRY.num_tokens, GEOMETRY.dim
    # last block: queries, proj and MLP for 1 token instead of 17; keys/values still for 17
    assert dense["blocks"][2] - cls_only["blocks"][2] == (n - 1) * (10 * d * d + 2 * d * n)
    # static attention drops q, k projections and the scores
    assert dense["blocks"][0] - static["blocks"][0] == 2 * n * d * d + n * n * d
