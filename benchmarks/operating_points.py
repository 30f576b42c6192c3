"""The structures the benchmarks time: each method at the operating point its paper reports,
built on a timm DeiT with random weights (latency does not depend on the weights), and ToMe at
the MACs of each Patch Slimming point.

- Patch Slimming: a nested token pyramid at the paper's MACs. Its shape is ours (the paper gives
  MACs, not per-block counts): block 0 keeps every patch, block b keeps round(P * rho^b) of them,
  the last block keeps only the prefix tokens (all the top-down search keeps there for a
  class-token model); rho is found by bisection so that the MACs land on the paper's.
- VTP: 20 % and 40 % of the gated dims with the cut a trained run makes (MLP hidden units carry
  the smallest gates; a few LayerNorm-output and value channels fall too), rounded to 8.
- DGSSA + GLAD: the structure of issue 10 and a ladder of stronger ones, each given for a
  12-block model as fractions of the depth and of the patches, so it maps to any depth/grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
from torch import nn
from vitslim.pruning.macs import plan_macs
from vitslim.pruning.methods.dgssa_glad import structure_plan
from vitslim.pruning.methods.patch_slimming import plan_from_token_sets
from vitslim.pruning.methods.vtp import VTPConfig, plan_from_gates
from vitslim.pruning.plan import SlimPlan, dense_plan, validate
from vitslim.pruning.timm_adapter import CHANNEL_SPACES, ViTGeometry, patch_grid, supported_geometry

from .tome import schedule_for_macs, tome_macs

# The papers' operating points and headline claims (theirs, not measured here).
PATCH_SLIMMING_GMACS = {"deit_tiny_patch16_224": 0.7, "deit_small_patch16_224": 2.6, "deit_base_patch16_224": 10.5}
VTP_RATIOS = (0.2, 0.4)
TOME_PAPER_R = 13
VTP_PAPER_DEIT_B = {0.2: {"params_m": 67.3, "gmacs": 13.8}, 0.4: {"params_m": 48.0, "gmacs": 10.0}}
PAPER_CLAIMS = (  # as quoted; where a number could not be checked against the paper, the source says so
    {
        "method": "Patch Slimming",
        "claim": "over 45 % of DeiT-Ti's FLOPs removed for −0.2 top-1; DeiT-S at 2.6 G: 79.4 % (ImageNet)",
        "source": "Tang et al., CVPR 2022 (abstract; results table)",
    },
    {
        "method": "VTP",
        "claim": "DeiT-B with 40 % pruned: 48.0 M params / 10.0 G",
        "source": "Zhu et al., 2021 (as quoted in the team's notes, unverified)",
    },
    {"method": "DGSSA + GLAD", "claim": "up to 2.21× DeiT throughput", "source": "Yu et al., 2023 (abstract)"},
    {
        "method": "ToMe",
        "claim": "DeiT-S, r = 13: +52 % throughput, training-free",
        "source": "Bolya et al., ICLR 2023 (as quoted in issue 11)",
    },
)


@dataclass(frozen=True)
class DGSSAStructure:
    """Static attention in the first `static` of 12 blocks; GLAD stages (block of 12, fraction of
    the patches kept), scaled to the model's depth and patch grid."""

    static: int
    stages: tuple[tuple[int, Fraction], ...]

    def pyramid(self, geometry: ViTGeometry) -> tuple[tuple[int, int], ...]:
        """(block, patches) for `geometry`: '7:98,10:49' on a 12-block 14 x 14 DeiT."""
        return tuple(
            (stage * geometry.depth // 12, int(fraction * geometry.num_patches)) for stage, fraction in self.stages
        )

    def static_blocks(self, geometry: ViTGeometry) -> int:
        return self.static * geometry.depth // 12

    def name(self) -> str:
        stages = ",".join(f"{b}:{f}" for b, f in self.stages)
        return f"dgssa-glad {self.static}s {stages}"


HALF, QUARTER, EIGHTH, SIXTEENTH = Fraction(1, 2), Fraction(1, 4), Fraction(1, 8), Fraction(1, 16)
DGSSA_ISSUE_10 = DGSSAStructure(4, ((7, HALF), (10, QUARTER)))
# Ever stronger aggregation, searched for the paper's 2.21x; the report names the first that gets there.
DGSSA_LADDER = (
    DGSSAStructure(4, ((4, HALF), (8, QUARTER))),
    DGSSAStructure(4, ((4, QUARTER), (8, EIGHTH))),
    DGSSAStructure(3, ((3, QUARTER), (6, EIGHTH))),
    DGSSAStructure(2, ((2, QUARTER), (5, EIGHTH))),
    DGSSAStructure(2, ((2, EIGHTH), (6, SIXTEENTH))),
    DGSSAStructure(1, ((1, EIGHTH), (4, SIXTEENTH))),
)


@dataclass(frozen=True)
class OperatingPoint:
    """One timed structure: a plan on the compact module, or a ToMe schedule; MACs per image."""

    variant: str
    method: str
    macs: int
    macs_fraction: float
    plan: Optional[SlimPlan] = None
    token_layout: str = "gather"
    channel_layout: str = "gather"
    tome_schedule: Optional[tuple[int, ...]] = None
    tome_scatter: bool = True  # ToMe's merge as scatter_add (the paper's code) or a one-hot matmul
    notes: dict = field(default_factory=dict)


def hidden_heavy_gates(geometry: ViTGeometry, seed: int = 0) -> dict:
    """Gate magnitudes shaped like a trained VTP run's: MLP hidden units the smallest, the other
    spaces larger with a small overlap, so that a few of their dims fall too."""
    generator = torch.Generator().manual_seed(seed)
    ranges = {"hidden": (0.0, 0.6), "qkv_in": (0.3, 1.0), "proj_in": (0.3, 1.0), "fc1_in": (0.3, 1.0)}
    return {
        (block, space): ranges[space][0]
        + (ranges[space][1] - ranges[space][0]) * torch.rand(geometry.channel_sizes[space], generator=generator)
        for block in range(geometry.depth)
        for space in CHANNEL_SPACES
    }


def pyramid_counts(geometry: ViTGeometry, rho: float) -> list[int]:
    """Patches kept by each block: all in block 0, round(P * rho^b) after, none in the last block
    of a class-token model (only the prefix tokens reach the head); never more than the block before."""
    counts = [min(geometry.num_patches, round(geometry.num_patches * rho**b)) for b in range(geometry.depth)]
    if not geometry.pools_patch_tokens:
        counts[-1] = 0
    else:
        counts = [max(1, c) for c in counts]
    return counts


def token_pyramid_plan(geometry: ViTGeometry, base: SlimPlan, counts: list[int], seed: int = 0) -> SlimPlan:
    """Nested token sets with `counts` patches per block (a seeded random ranking of the patches)."""
    prefix = geometry.num_prefix_tokens
    order = (torch.randperm(geometry.num_patches, generator=torch.Generator().manual_seed(seed)) + prefix).tolist()
    sets = [tuple(range(prefix)) + tuple(sorted(order[:count])) for count in counts]
    return plan_from_token_sets(sets, base, geometry.num_tokens)


def patch_slimming_pyramid(geometry: ViTGeometry, base: SlimPlan, target_macs: int) -> tuple[SlimPlan, float]:
    """The pyramid (and its rho) whose MACs are the largest not above `target_macs`."""
    low, high = 0.0, 1.0
    for _ in range(40):
        rho = (low + high) / 2
        plan = token_pyramid_plan(geometry, base, pyramid_counts(geometry, rho))
        if plan_macs(plan, geometry)["total"] <= target_macs:
            low = rho
        else:
            high = rho
    return token_pyramid_plan(geometry, base, pyramid_counts(geometry, low)), low


def dgssa_plan(model: nn.Module, geometry: ViTGeometry, base: SlimPlan, structure: DGSSAStructure) -> SlimPlan:
    """The structure's plan as the method initialises it (dgssa_glad.structure_plan)."""
    plan = structure_plan(
        base, structure.static_blocks(geometry), structure.pyramid(geometry), geometry, patch_grid(model)
    )
    validate(plan, geometry)
    return plan


def operating_points(model: nn.Module, base: SlimPlan, layouts: bool = False) -> list[OperatingPoint]:
    """Every structure of `model` (timm DeiT): dense, the papers' points, ToMe matched to Patch
    Slimming (its merge as scatter_add, and as a one-hot matmul that TensorRT parses); with
    `layouts`, also the alternative ONNX layouts of Patch Slimming and VTP 40 %."""
    geometry = supported_geometry(model)
    dense_macs = plan_macs(dense_plan(base.model, geometry.depth), geometry)["total"]

    def point(variant: str, method: str, plan: Optional[SlimPlan] = None, schedule=None, **kwargs) -> OperatingPoint:
        macs = plan_macs(plan, geometry)["total"] if plan is not None else tome_macs(schedule, geometry)
        return OperatingPoint(variant, method, macs, macs / dense_macs, plan=plan, tome_schedule=schedule, **kwargs)

    points = [point("dense", "dense", dense_plan(base.model, geometry.depth))]
    target = None if base.model.kwargs else PATCH_SLIMMING_GMACS.get(base.model.name)  # the papers' own models only
    target_macs = int(target * 1e9) if target else int(0.56 * dense_macs)  # other models: the papers' ~44 % cut
    slim, rho = patch_slimming_pyramid(geometry, base, target_macs)
    kept = [len(b.kept_tokens) if b.kept_tokens is not None else None for b in slim.blocks]
    points.append(
        point(
            "patch-slim",
            "patch-slim",
            slim,
            notes={
                "rho": rho,
                "target_gmacs": target_macs / 1e9,
                "patches_per_block": pyramid_counts(geometry, rho),
                "kept_tokens": kept,
            },
        )
    )
    if layouts:
        points.append(point("patch-slim slice", "patch-slim", slim, token_layout="slice"))
    gates = hidden_heavy_gates(geometry)
    for ratio in VTP_RATIOS:
        vtp = plan_from_gates(gates, geometry, base, VTPConfig(prune_ratio=ratio, round_to=8))
        points.append(point(f"vtp {ratio:.0%}", "vtp", vtp, channel_layout="masked"))
        if layouts and ratio == 0.4:
            points.append(point(f"vtp {ratio:.0%} gather", "vtp", vtp))
            points.append(
                point(
                    f"vtp {ratio:.0%} round 64",
                    "vtp",
                    plan_from_gates(gates, geometry, base, VTPConfig(prune_ratio=ratio, round_to=64)),
                    channel_layout="masked",
                )
            )
    for structure in (DGSSA_ISSUE_10, *DGSSA_LADDER):
        points.append(
            point(
                structure.name(),
                "dgssa-glad",
                dgssa_plan(model, geometry, base, structure),
                notes={"static_blocks": structure.static_blocks(geometry), "pyramid": structure.pyramid(geometry)},
            )
        )
    schedule = schedule_for_macs(plan_macs(slim, geometry)["total"], geometry)
    points.append(point("tome", "tome", schedule=schedule, notes={"matched_to": "patch-slim"}))
    points.append(
        point("tome one-hot", "tome", schedule=schedule, tome_scatter=False, notes={"matched_to": "patch-slim"})
    )
    if (
        base.model.name == "deit_small_patch16_224" and not base.model.kwargs
    ):  # the ToMe paper's DeiT-S point, to check this implementation against its claim
        points.append(point(f"tome r={TOME_PAPER_R}", "tome", schedule=(TOME_PAPER_R,) * geometry.depth))
    return points
