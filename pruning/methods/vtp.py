"""VTP, Vision Transformer Pruning (Zhu, Tang, Han 2021): learnable per-dimension gates on the
inputs of qkv, proj, fc1 and fc2 trained with an L1 penalty, a global threshold that removes a
requested fraction of the gated dimensions, gate values folded into the weights, fine-tuning.

The gates live on the same four channel spaces the SlimPlan selects in (CHANNEL_SPACES), so the
result is a plan with `qkv_in`, `proj_in`, `fc1_in` and `hidden` per block. Started from a token
method's run, the gates train under its plan and the result keeps its tokens.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from vitslim.core.settings import setting

from ..checkpoints import phase_path
from ..data import DataSplits
from ..errors import PruningError
from ..latency import LatencyBudget, LatencyTargetSettings
from ..macs import kept_channels
from ..plan import SlimPlan, plan_digest
from ..reference import MaskedReference, plan_applied, scaled_channels
from ..timm_adapter import CHANNEL_SPACES, ViTGeometry, block_parts, blocks_of
from ..train import AugmentationSettings, TrainConfig, evaluate, fit, parameter_groups
from .base import WIDTH_FIELDS, MethodResult, composed_name, register_method, start

GateKey = tuple[int, str]  # (block index, channel space)
DEFAULT_PRUNE_RATIO = 0.4
MAX_SEARCHED_RATIO = 0.95  # a latency target's search never removes more of the gated dims
# A latency target's search also tries --round-to times each of these (8, 16, 32 and 64 from the
# default). Coarser rounding removes channels in bigger steps but can keep value heads whole (64 per
# head in DeiT-S), which a GPU runs without the narrower value heads' step (pruning.latency.value_step):
# on the H200 onnxruntime-gpu table at batch 256 VTP could not reach 1.25x timm's model at rounding 8
# (benchmarks/results/latency_model_onnx_gpu_256.json).
ROUNDING_MULTIPLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class VTPConfig(AugmentationSettings, LatencyTargetSettings):
    prune_ratio: Optional[float] = setting(
        None,
        f"fraction of all gated dimensions to remove, in (0, 1) (default {DEFAULT_PRUNE_RATIO}; with a latency target "
        "the smallest ratio that meets it is searched instead)",
    )
    l1: float = setting(1e-4, "weight λ of the sparsity penalty λ·Σ|gate| (the paper's value is 1e-4)")
    sparsity_epochs: int = setting(5, "epochs of sparsity training with the gates")
    finetune_epochs: int = setting(15, "epochs of fine-tuning after pruning")
    lr: float = setting(5e-4, "learning rate of the weights")
    gate_lr: float = setting(1e-2, "learning rate of the gates (they move much further than the weights)")
    batch_size: int = setting(64, "batch size")
    distill_weight: float = setting(
        0.0, "weight of logit distillation from the model it starts from, in [0, 1] (the paper uses none)"
    )
    round_to: int = setting(
        8,
        "round kept counts per module (per head for values) to a multiple; 8 keeps fp16 fused attention and GEMMs "
        "aligned (64 removes fewer channels; on an H100 it measured 2 % faster to 7 % slower than 8, BENCHMARKS.md); "
        "with a latency target, 2, 4 and 8 times it are searched too",
    )
    per_module: bool = setting(False, "one threshold per gate instead of one global threshold")
    seed: int = setting(0, "random seed")

    def __post_init__(self) -> None:
        super().__post_init__()  # the augmentation settings; every float finite
        self.check_latency_settings()
        if self.prune_ratio is not None and self.has_latency_target:
            raise PruningError(
                "give --prune-ratio or a latency target (--target-ms / --target-speedup), not both "
                "(in a recipe: prune_ratio: null)"
            )
        if self.prune_ratio is not None and not 0.0 < self.prune_ratio < 1.0:
            raise PruningError(
                f"--prune-ratio {self.prune_ratio} must be in (0, 1), e.g. 0.4 removes 40 % of the gated dims"
            )
        if self.l1 < 0:
            raise PruningError(f"--l1 {self.l1} must be >= 0")
        if self.round_to < 1:
            raise PruningError(f"--round-to {self.round_to} must be >= 1 (8 suits TensorRT's fused attention)")
        if self.sparsity_epochs < 0 or self.finetune_epochs < 0:
            raise PruningError("epoch counts must be >= 0")


class VTPGates(nn.Module):
    """One learnable gate vector per block and channel space, initialised to 1."""

    def __init__(self, geometry: ViTGeometry) -> None:
        super().__init__()
        sizes = geometry.channel_sizes
        self.keys = [(block, space) for block in range(geometry.depth) for space in CHANNEL_SPACES]
        self.values = nn.ParameterList([nn.Parameter(torch.ones(sizes[space])) for _, space in self.keys])

    def as_dict(self) -> dict[GateKey, torch.Tensor]:
        return dict(zip(self.keys, self.values))

    def l1(self) -> torch.Tensor:
        return sum(gate.abs().sum() for gate in self.values)


class GatedModel(nn.Module):
    """`model` under the start plan `base`, with its four channel spaces per block multiplied by
    `gates` (timm's forward kept)."""

    def __init__(self, model: nn.Module, base: SlimPlan, gates: VTPGates) -> None:
        super().__init__()
        self.model, self.base, self.gates = model, base, gates

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with plan_applied(self.model, self.base, check=False), scaled_channels(self.model, self.gates.as_dict()):
            return self.model(images)


# ------------------------------------------------------------------------------ pure selection math


def ranking_scores(gates: Mapping[GateKey, torch.Tensor], seed: int = 0) -> dict[GateKey, torch.Tensor]:
    """|gate| in float64 plus a tiny seeded jitter, so that equal gates (e.g. all still 1) are
    ranked by a fixed random order instead of by position."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: gate.detach().abs().double().cpu()
        + 1e-9 * torch.rand(gate.numel(), generator=generator, dtype=torch.float64)
        for key, gate in gates.items()
    }


def kept_counts(scores: Mapping[GateKey, torch.Tensor], ratio: float, per_module: bool) -> dict[GateKey, int]:
    """How many dims each gate keeps when the `ratio` smallest scores are removed, globally
    (one threshold over all gates) or per gate."""
    if per_module:
        return {key: s.numel() - int(round(ratio * s.numel())) for key, s in scores.items()}
    keys = list(scores)
    flat = torch.cat([scores[k] for k in keys])
    owner = torch.cat([torch.full((scores[k].numel(),), i) for i, k in enumerate(keys)])
    removed = owner[torch.argsort(flat)[: int(round(ratio * flat.numel()))]]
    removed_per_key = torch.bincount(removed, minlength=len(keys)).tolist()
    return {k: scores[k].numel() - removed_per_key[i] for i, k in enumerate(keys)}


def _round_count(count: float, multiple: int, size: int) -> int:
    """Nearest multiple of `multiple` in [multiple, size] (at least 1, at most size)."""
    rounded = int(round(count / multiple)) * multiple
    return max(min(multiple, size), min(size, max(rounded, 1)))


def constrained_count(space: str, count: int, geometry: ViTGeometry, round_to: int) -> int:
    """Make a kept count expressible: the same value width in every head (rounded per head) and a
    multiple of `round_to` per module."""
    if space == "proj_in":
        per_head = _round_count(count / geometry.num_heads, round_to, geometry.head_dim)
        return per_head * geometry.num_heads
    return _round_count(count, round_to, geometry.channel_sizes[space])


def top_indices(scores: torch.Tensor, count: int, groups: int = 1) -> tuple[int, ...]:
    """Indices of the `count` largest scores, taken equally from `groups` contiguous groups; sorted."""
    size = scores.numel() // groups
    per_group = count // groups
    kept = [
        g * size + int(i)
        for g in range(groups)
        for i in torch.topk(scores[g * size : (g + 1) * size], per_group).indices
    ]
    return tuple(sorted(kept))


def plan_from_gates(
    gates: Mapping[GateKey, torch.Tensor],
    geometry: ViTGeometry,
    base: SlimPlan,
    config: VTPConfig,
    ratio: Optional[float] = None,
) -> SlimPlan:
    """`base` keeping, per gate, the dims that survive the threshold (constrained as above) when
    `ratio` of them (default: the config's) are removed."""
    scores = ranking_scores(gates, config.seed)
    ratio = ratio if ratio is not None else (config.prune_ratio or DEFAULT_PRUNE_RATIO)
    counts = kept_counts(scores, ratio, config.per_module)
    blocks = []
    for index in range(geometry.depth):
        fields = {}
        for space in CHANNEL_SPACES:
            key = (index, space)
            count = constrained_count(space, counts[key], geometry, config.round_to)
            if count < scores[key].numel():
                heads = geometry.num_heads if space == "proj_in" else 1
                fields[space] = top_indices(scores[key], count, heads)
        blocks.append(replace(base.blocks[index], **fields))
    return SlimPlan(model=base.model, blocks=tuple(blocks), method=composed_name(base, "vtp"))


def ratio_for_target(
    gates: Mapping[GateKey, torch.Tensor], geometry: ViTGeometry, base: SlimPlan, config: VTPConfig, fits
) -> float:
    """The smallest prune ratio (the most gate magnitude kept, the method's own accuracy proxy)
    whose plan `fits` the target: bisection, the ratio's plan being monotone in it."""
    low, high = 0.0, MAX_SEARCHED_RATIO
    if not fits(plan_from_gates(gates, geometry, base, config, high)):
        return high  # the caller names the shortfall
    for _ in range(20):
        middle = (low + high) / 2
        if fits(plan_from_gates(gates, geometry, base, config, middle)):
            high = middle
        else:
            low = middle
    return high


def kept_magnitude(gates: Mapping[GateKey, torch.Tensor], plan: SlimPlan) -> float:
    """The sum of |gate| over the dims `plan` keeps: the accuracy proxy compared across roundings
    (a ratio is not: the same ratio keeps other dims at another rounding)."""
    total = 0.0
    for (index, space), gate in gates.items():
        kept = getattr(plan.blocks[index], space)
        magnitude = gate.detach().abs().double().cpu()
        total += float(magnitude.sum() if kept is None else magnitude[list(kept)].sum())
    return total


@dataclass(frozen=True)
class TargetedStructure:
    """What VTP's latency search chose: the prune ratio and rounding, their plan and its proxy."""

    ratio: float
    round_to: int
    plan: SlimPlan
    kept_magnitude: float


def structure_for_target(
    gates: Mapping[GateKey, torch.Tensor],
    geometry: ViTGeometry,
    base: SlimPlan,
    config: VTPConfig,
    budget: LatencyBudget,
) -> TargetedStructure:
    """Per rounding (config.round_to times ROUNDING_MULTIPLES), the smallest ratio whose plan fits
    `budget`; of those that fit, the one keeping the most gate magnitude; none fits: the fastest
    of them (the caller names the shortfall)."""
    candidates = []
    for multiple in ROUNDING_MULTIPLES:
        rounded = replace(config, round_to=config.round_to * multiple)
        ratio = ratio_for_target(gates, geometry, base, rounded, budget.fits)
        plan = plan_from_gates(gates, geometry, base, rounded, ratio)
        candidates.append(TargetedStructure(ratio, rounded.round_to, plan, kept_magnitude(gates, plan)))
    fitting = [c for c in candidates if budget.fits(c.plan)]
    if not fitting:
        return min(candidates, key=lambda c: budget.predicted_ms(c.plan))
    return max(fitting, key=lambda c: c.kept_magnitude)  # on a tie, the finest rounding


def fold_gates(model: nn.Module, gates: Mapping[GateKey, torch.Tensor]) -> nn.Module:
    """A copy of `model` whose weight columns absorb the gates: W[:, j] <- gate_j * W[:, j] for the
    Linear reading each gated space, so that the gated function is preserved without gates."""
    folded = copy.deepcopy(model)
    blocks = blocks_of(folded)
    with torch.no_grad():
        for (index, space), gate in gates.items():
            linear = block_parts(blocks[index]).reader_of(space)
            linear.weight.mul_(gate.detach().to(linear.weight)[None, :])
    return folded


# ------------------------------------------------------------------------------------ the method


def _train_config(config: VTPConfig, epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        distill_weight=config.distill_weight,
        seed=config.seed,
        warmup_epochs=0,
        **config.augmentation_settings(),
    )


def kept_dims_table(plan: SlimPlan, geometry: ViTGeometry) -> list[dict]:
    return [{"block": i, **kept_channels(block, geometry)} for i, block in enumerate(plan.blocks)]


def pruned_fraction(plan: SlimPlan, geometry: ViTGeometry) -> float:
    rows = kept_dims_table(plan, geometry)
    total = geometry.depth * sum(geometry.channel_sizes.values())
    return 1.0 - sum(row[s] for row in rows for s in CHANNEL_SPACES) / total


@register_method("vtp", "VTP", VTPConfig, decides=WIDTH_FIELDS)
def prune_vtp(
    model: nn.Module,
    data: DataSplits,
    config: VTPConfig,
    base: SlimPlan,
    checkpoints: Optional[Path] = None,
) -> MethodResult:
    """Sparsity training -> global threshold -> fold -> fine-tune. `model` is not modified."""
    geometry, start_model = start(model, base, "vtp")
    budget = LatencyBudget.from_settings(config, geometry, base)  # a bad table fails before any training
    teacher = start_model if config.distill_weight > 0 else None
    report = {"config": asdict(config), "top1_start": evaluate(start_model, data.val)}
    gates = VTPGates(geometry)
    gated = GatedModel(copy.deepcopy(model), base, gates)
    groups = parameter_groups(gated.model, TrainConfig.weight_decay) + [
        {"params": list(gates.parameters()), "lr": config.gate_lr, "weight_decay": 0.0}
    ]
    sparsity = fit(
        gated,
        data,
        _train_config(config, config.sparsity_epochs),
        teacher=teacher,
        extra_loss=lambda: config.l1 * gates.l1(),
        groups=groups,
        checkpoint_path=phase_path(checkpoints, "sparsity"),
        resume_key={"start": plan_digest(base)},  # the start plan is hooks, not weights
    )
    report["top1_after_sparsity_training"] = sparsity.val_top1
    if budget is not None and budget.target_ms is not None:
        chosen = structure_for_target(gates.as_dict(), geometry, base, config, budget)
        if not budget.fits(chosen.plan):
            roundings = ", ".join(str(config.round_to * multiple) for multiple in ROUNDING_MULTIPLES)
            raise budget.unreachable(
                chosen.plan, f"VTP (removing up to {MAX_SEARCHED_RATIO:.0%} of the gated dims, rounding to {roundings})"
            )
        ratio, round_to, plan = chosen.ratio, chosen.round_to, chosen.plan
    else:
        ratio, round_to = config.prune_ratio or DEFAULT_PRUNE_RATIO, config.round_to
        plan = plan_from_gates(gates.as_dict(), geometry, base, config, ratio)
    report.update(prune_ratio=ratio, round_to=round_to, kept_gate_magnitude=kept_magnitude(gates.as_dict(), plan))
    if budget is not None:
        report["latency"] = budget.report(plan)
    folded = fold_gates(gated.model, gates.as_dict())
    masked = MaskedReference(folded, plan)
    report["top1_after_pruning"] = evaluate(masked, data.val)
    finetune = fit(
        masked,
        data,
        _train_config(config, config.finetune_epochs),
        teacher=teacher,
        checkpoint_path=phase_path(checkpoints, "finetune"),
        # the masks are hooks, not weights: a resumed fine-tuning must be of this plan
        resume_key={"plan": plan_digest(plan)},
    )
    report.update(
        top1_after_finetune=finetune.val_top1 if config.finetune_epochs else report["top1_after_pruning"],
        pruned_fraction=pruned_fraction(plan, geometry),
        kept_dims=kept_dims_table(plan, geometry),
        history={"sparsity": list(sparsity.history), "finetune": list(finetune.history)},
        augmentation=finetune.augmentation,  # what both phases applied ("auto" resolved)
    )
    return MethodResult(plan=plan, model=folded.cpu().eval(), top1=report["top1_after_finetune"], report=report)
