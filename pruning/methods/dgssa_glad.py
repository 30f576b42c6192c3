"""DGSSA + GLAD ("Accelerating Vision Transformers Based on Heterogeneous Attention Patterns",
Yu et al. 2023). Only the abstract is known; the design choices below are ours (docs/methods.md):

- analysis: per block and head, how alike attention maps are across images (cosine to the
  dataset-mean map, KL to it) and how low-rank they are (effective rank, top singular energy);
- DGSSA: the first K blocks (or the leading run above a similarity threshold) get a static,
  row-stochastic attention matrix per head, softmax(logits), with logits initialised from the
  log of the dataset-mean attention and fine-tuned with the task loss, distillation from the
  start model (the dense model, or the VTP run it starts from) and an attention-distillation
  term toward the start model's dynamic maps;
- GLAD: at pyramid stages (block index -> patch count) the patch tokens are replaced by a learned
  linear map on the token axis, initialised as spatial average pooling; prefix tokens pass.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.core.settings import setting

from ..checkpoints import phase_path
from ..data import DataSplits, calibration_set
from ..errors import PruningError
from ..latency import LatencyBudget, LatencyTargetSettings
from ..macs import macs_fraction
from ..plan import SlimPlan, plan_digest
from ..reference import MaskedReference, plan_applied, recorded_attention
from ..timm_adapter import ViTGeometry, patch_grid, supported_geometry
from ..train import AugmentationSettings, TrainConfig, evaluate, fit
from .base import TOKEN_FIELDS, MethodResult, composed_name, register_method, start

LOG_FLOOR = 1e-6  # δ in logits = log(mean attention + δ)
STATIC_INITS = ("mean-attention", "random")
AUTO = "auto"


@dataclass(frozen=True)
class DGSSAGladConfig(AugmentationSettings, LatencyTargetSettings):
    static_blocks: Optional[int] = setting(None, "DGSSA: the first K blocks get static attention")
    max_static_blocks: Optional[int] = setting(
        None,
        "DGSSA with --pyramid auto and a target: instead of K, search 0..M static blocks together with the pyramid and "
        "keep the structure whose initialised model predicts closest to the start model on the calibration images",
    )
    similarity_threshold: Optional[float] = setting(
        None, "DGSSA: instead of K, the leading blocks whose attention cosine similarity across images is >= S"
    )
    pyramid: str = setting(
        "",
        "GLAD: 'BLOCK:PATCHES,...', e.g. '7:98,10:49' aggregates to 98 patches before block 7, 49 before block 10; "
        "'auto': stages from the attention's effective rank, to --target-macs or a latency target; empty: none",
    )
    target_macs: Optional[float] = setting(
        None, "GLAD with --pyramid auto: the fraction of dense MACs to keep, in (0, 1]"
    )
    finetune_epochs: int = setting(10, "epochs of fine-tuning")
    lr: float = setting(5e-4, "learning rate of the weights")
    static_lr: float = setting(1e-2, "learning rate of the static-attention logits and aggregation matrices")
    attention_weight: float = setting(
        1.0,
        "DGSSA: weight of the guidance term, the row-wise KL divergence from the start model's maps on the batch to the static ones (0: initialisation only)",
    )
    static_init: str = setting(
        "mean-attention",
        "DGSSA: initial static logits: 'mean-attention' (log of the dataset-mean maps) or 'random' (the ablation baseline)",
    )
    distill_weight: float = setting(0.5, "weight of logit distillation from the model it starts from, in [0, 1]")
    batch_size: int = setting(64, "batch size")
    calibration_images: int = setting(256, "training images (stratified by class, seeded) for the attention statistics")
    seed: int = setting(0, "random seed")

    def __post_init__(self) -> None:
        super().__post_init__()  # the augmentation settings; every float finite
        given = [
            flag
            for flag, value in (
                ("--static-blocks K", self.static_blocks),
                ("--max-static-blocks M", self.max_static_blocks),
                ("--similarity-threshold S", self.similarity_threshold),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise PruningError(f"give only one of {' or '.join(given)}")
        if self.static_blocks is not None and self.static_blocks < 0:
            raise PruningError(f"--static-blocks {self.static_blocks} must be >= 0")
        if self.max_static_blocks is not None and self.max_static_blocks < 1:
            raise PruningError(
                f"--max-static-blocks {self.max_static_blocks} must be >= 1 (for no static blocks, leave it out)"
            )
        if self.max_static_blocks is not None and self.pyramid.strip() != AUTO:
            raise PruningError(
                "--max-static-blocks searches the static blocks together with the pyramid: add --pyramid auto and a "
                "target (--target-macs F, or --target-ms / --target-speedup with --latency-table)"
            )
        if not self.static_blocks and self.similarity_threshold is None and not self.pyramid.strip():
            raise PruningError(
                "dgssa-glad with neither static blocks nor a pyramid changes nothing: give --static-blocks K, "
                "--similarity-threshold S or --pyramid (e.g. --pyramid auto --target-macs 0.5)"
            )
        if self.similarity_threshold is not None and not -1 <= self.similarity_threshold <= 1:
            raise PruningError(f"--similarity-threshold {self.similarity_threshold} is a cosine similarity, in [-1, 1]")
        if self.finetune_epochs < 0 or self.attention_weight < 0:
            raise PruningError("--finetune-epochs and the attention weight must be >= 0")
        if self.static_init not in STATIC_INITS:
            raise PruningError(f"--static-init {self.static_init!r} is not one of {STATIC_INITS}")
        self.check_latency_settings()
        if self.target_macs is not None and self.has_latency_target:
            raise PruningError("give --target-macs or a latency target (--target-ms / --target-speedup), not both")
        if (self.pyramid.strip() == AUTO) != (self.target_macs is not None or self.has_latency_target):
            raise PruningError(
                "--pyramid auto goes with a target: --target-macs F (the fraction of dense MACs to keep) or "
                "--target-ms / --target-speedup with --latency-table"
            )
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise PruningError(f"--target-macs {self.target_macs} must be in (0, 1]")
        if self.pyramid.strip() != AUTO:
            parse_pyramid(self.pyramid)


def parse_pyramid(text: str) -> tuple[tuple[int, int], ...]:
    """'7:98,10:49' -> ((7, 98), (10, 49)): aggregate before block 7 to 98 patches, before 10 to 49."""
    if not text.strip():
        return ()
    stages = []
    for item in text.split(","):
        block, sep, count = item.strip().partition(":")
        try:
            stages.append((int(block), int(count)))
        except ValueError:
            raise PruningError(f"--pyramid entry {item!r} is not BLOCK:PATCHES (e.g. 7:98)") from None
        if not sep:
            raise PruningError(f"--pyramid entry {item!r} is not BLOCK:PATCHES (e.g. 7:98)")
    return tuple(stages)


def check_pyramid(stages: tuple[tuple[int, int], ...], geometry: ViTGeometry) -> None:
    """Stages at increasing block indices inside the model, each with fewer patches than before."""
    previous_block, previous_count = -1, geometry.num_patches
    for block, count in stages:
        if not 0 <= block < geometry.depth:
            raise PruningError(
                f"--pyramid stage at block {block} is out of range: the model has blocks 0..{geometry.depth - 1}"
            )
        if block <= previous_block:
            raise PruningError(f"--pyramid stages must be at increasing blocks ({previous_block} then {block})")
        if not 1 <= count < previous_count:
            raise PruningError(
                f"--pyramid must shrink: {count} patches at block {block} after {previous_count} (a pyramid that grows is refused)"
            )
        previous_block, previous_count = block, count


# ------------------------------------------------------------------------------ pure analysis math


def attention_similarity(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """maps [B, H, N, N] (rows sum to 1) -> per head [H]: mean cosine to the mean map and mean row KL(map || mean)."""
    mean = maps.mean(dim=0, keepdim=True)
    cosine = F.cosine_similarity(maps.flatten(2), mean.flatten(2), dim=-1).mean(dim=0)
    kl = (maps * (maps.clamp_min(1e-12).log() - mean.clamp_min(1e-12).log())).sum(dim=-1).mean(dim=(0, 2))
    return {"cosine": cosine, "kl": kl}


def attention_rank(maps: torch.Tensor, top: int) -> dict[str, torch.Tensor]:
    """maps [B, H, N, N] -> per head [H]: mean effective rank (exp of the singular-value entropy)
    and mean fraction of squared singular values in the `top` largest."""
    singular = torch.linalg.svdvals(maps.double())
    weights = singular / singular.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    effective = torch.exp(-(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)).mean(dim=0)
    energy = singular.pow(2)
    top_energy = (energy[..., :top].sum(dim=-1) / energy.sum(dim=-1).clamp_min(1e-12)).mean(dim=0)
    return {"effective_rank": effective.float(), "top_energy": top_energy.float()}


def attention_divergence(static: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
    """KL(dynamic row || static row) summed over keys, averaged over images, heads and query rows.

    static [H, N_out, N_in] and dynamic [B, H, N_out, N_in] are row-stochastic. Its gradient on a
    static logit is (static - mean dynamic) / (H · N_out), of the task loss's order away from the
    dense maps (tests/pruning/test_dgssa_glad.py measures it); the mean squared error between the
    maps used before was 1e-4 to 4e-6 of the task loss's gradient on digits and did nothing.
    """
    target = dynamic.clamp_min(1e-12)
    return (target * (target.log() - static.clamp_min(1e-12).log().unsqueeze(0))).sum(dim=-1).mean()


def pooling_matrix(grid: tuple[int, int], count: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A [count, rows*cols] spatial average-pooling map and the output grid it produces.

    The output grid is the factorisation of `count` closest to the input's aspect ratio; tokens are
    row-major. Each output token averages the inputs that adaptive pooling assigns to it.
    """
    rows, cols = grid
    pairs = [(r, count // r) for r in range(1, count + 1) if count % r == 0 and r <= rows and count // r <= cols]
    if not pairs:
        raise PruningError(
            f"cannot pool a {rows}x{cols} patch grid to {count} tokens: choose a count that fits a smaller grid"
        )
    out_rows, out_cols = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(rows / cols)))
    basis = torch.eye(rows * cols).reshape(rows * cols, 1, rows, cols)
    pooled = F.adaptive_avg_pool2d(basis, (out_rows, out_cols)).reshape(rows * cols, count)
    return pooled.T.contiguous(), (out_rows, out_cols)


# ------------------------------------------------------------------------------ the method


class _Trainable(nn.Module):
    """The model with learnable static-attention logits and aggregation matrices, applied through a
    plan built on every forward from the start plan `base` (so timm's forward and the reference
    hooks do the work). `teacher`: the start's model, whose maps under `base` guide the static ones."""

    def __init__(
        self,
        model: nn.Module,
        base: SlimPlan,
        logits: dict[int, torch.Tensor],
        aggregations: dict[int, torch.Tensor],
        teacher: nn.Module,
    ) -> None:
        super().__init__()
        self.model, self.base, self.teacher = model, base, teacher
        self.logits = nn.ParameterDict({str(b): nn.Parameter(v.clone()) for b, v in logits.items()})
        self.aggregations = nn.ParameterDict({str(b): nn.Parameter(v.clone()) for b, v in aggregations.items()})
        self.attention_loss = torch.zeros(())
        for p in teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "_Trainable":
        super().train(mode)
        self.teacher.eval()  # the guidance's maps come from the start model as it predicts
        return self

    def plan(self) -> SlimPlan:
        return glad_plan(
            self.base,
            {int(b): logits.softmax(dim=-1) for b, logits in self.logits.items()},
            {int(b): matrix for b, matrix in self.aggregations.items()},
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        plan = self.plan()
        if self.training and self.logits:
            with (
                torch.no_grad(),
                plan_applied(self.teacher, self.base, check=False),
                recorded_attention(self.teacher) as records,
            ):
                self.teacher(images)
            self.attention_loss = sum(
                attention_divergence(plan.blocks[int(b)].static_attention, records[int(b)]["attention"])
                for b in self.logits
            )
        with plan_applied(self.model, plan, check=False):
            return self.model(images)


def analyse_attention(
    start_model: MaskedReference, images: torch.Tensor, batch_size: int
) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Per-block analysis rows (means over heads, and per head) and the dataset-mean maps [H, N, N]
    of the start model (a model under its start plan)."""
    model = start_model.model
    geometry = supported_geometry(model)
    per_image: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad(), plan_applied(model, start_model.plan, check=False), recorded_attention(model) as records:
        for chunk in images.split(batch_size):
            model(chunk)
            for block, record in records.items():
                per_image.setdefault(block, []).append(record["attention"])
    rows, means = [], {}
    top = 1  # share of the squared singular values in the largest one
    for block in range(geometry.depth):
        maps = torch.cat(per_image[block])
        means[block] = maps.mean(dim=0)
        similarity, rank = attention_similarity(maps), attention_rank(maps, top)
        rows.append(
            {
                "block": block,
                "cosine": float(similarity["cosine"].mean()),
                "kl": float(similarity["kl"].mean()),
                "effective_rank": float(rank["effective_rank"].mean()),
                "top_energy": float(rank["top_energy"].mean()),
                "top_k": top,
                "per_head": {name: values.tolist() for name, values in {**similarity, **rank}.items()},
            }
        )
    return rows, means


def check_static_blocks(config: DGSSAGladConfig, depth: int) -> None:
    """Refuse a static-block count deeper than the model (before the analysis runs)."""
    for flag, value in (("--static-blocks", config.static_blocks), ("--max-static-blocks", config.max_static_blocks)):
        if value is not None and value > depth:
            raise PruningError(f"{flag} {value} is larger than the model's depth {depth}")


def static_block_count(config: DGSSAGladConfig, analysis: list[dict], depth: int) -> int:
    """The static blocks the settings fix (0 where --max-static-blocks leaves them to the search)."""
    if config.static_blocks is not None:
        return config.static_blocks
    if config.similarity_threshold is None:
        return 0
    count = 0
    while count < depth and analysis[count]["cosine"] >= config.similarity_threshold:
        count += 1
    return count


def pyramid_for_ranks(
    ranks: list[float], static: int, kappa: float, grid: tuple[int, int]
) -> tuple[tuple[int, int], ...]:
    """Stages for one scale `kappa`: block b (after the static ones) needs about kappa x its maps'
    effective rank in patches; the count may only fall with depth, in halvings of the patch grid
    (what average pooling makes cleanly), and a stage starts where it falls."""
    patches = grid[0] * grid[1]
    stages, level, current_grid = [], 0, grid
    for block in range(static, len(ranks)):
        needed = max(1.0, kappa * ranks[block])
        wanted = max(level, int(math.floor(math.log2(patches / needed))) if needed < patches else 0)
        while level < wanted:
            count = patches >> (level + 1)
            try:
                _, next_grid = pooling_matrix(current_grid, count)
            except PruningError:
                break  # the grid cannot halve again
            level, current_grid = level + 1, next_grid
        if level and (not stages or stages[-1][1] != patches >> level):
            stages.append((block, patches >> level))
    return tuple(stages)


def steepest_pyramid(analysis: list[dict], static: int, grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The fewest tokens --pyramid auto can keep after `static` blocks (the scale kappa at 0)."""
    return pyramid_for_ranks([row["effective_rank"] for row in analysis], static, 0.0, grid)


def auto_pyramid(
    analysis: list[dict], static: int, geometry: ViTGeometry, grid: tuple[int, int], fits, target_name: str
) -> tuple[tuple[int, int], ...]:
    """The GLAD stages from the effective-rank analysis that keep the most tokens (the largest
    kappa) while `fits(stages)` (the target: MACs or predicted latency, as `target_name` says):
    bisection on kappa (more kappa, more tokens)."""
    ranks = [row["effective_rank"] for row in analysis]
    low, high = 0.0, float(geometry.num_patches)
    if not fits(steepest_pyramid(analysis, static, grid)):
        raise PruningError(
            f"{target_name}: even the steepest pyramid the patch grid allows does not meet it; "
            "raise the target or add static blocks"
        )
    for _ in range(30):
        kappa = (low + high) / 2
        if fits(pyramid_for_ranks(ranks, static, kappa, grid)):
            low = kappa
        else:
            high = kappa
    return pyramid_for_ranks(ranks, static, low, grid)


def initial_logits(mean_map: torch.Tensor, config: DGSSAGladConfig) -> torch.Tensor:
    """The dataset-mean attention's log (the guidance the method starts from) or, for the
    ablation, seeded standard-normal logits."""
    if config.static_init == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randn(mean_map.shape, generator=generator)
    return (mean_map + LOG_FLOOR).log()


def glad_plan(base: SlimPlan, static_maps: dict[int, torch.Tensor], aggregations: dict[int, torch.Tensor]) -> SlimPlan:
    """`base` with static attention maps [H, N, N] and aggregation matrices at their blocks (the
    start plan's widths kept)."""
    blocks = list(base.blocks)
    for block in sorted(set(static_maps) | set(aggregations)):
        blocks[block] = replace(
            blocks[block], token_aggregation=aggregations.get(block), static_attention=static_maps.get(block)
        )
    return SlimPlan(model=base.model, blocks=tuple(blocks), method=composed_name(base, "dgssa-glad"))


def start_logits(mean_maps: dict[int, torch.Tensor], static: int, config: DGSSAGladConfig) -> dict[int, torch.Tensor]:
    """The logits of the first `static` blocks' static attention that fine-tuning starts from."""
    return {block: initial_logits(mean_maps[block], config) for block in range(static)}


def pyramid_target(config: DGSSAGladConfig, budget: Optional[LatencyBudget], geometry: ViTGeometry):
    """What --pyramid auto must meet: `fits(plan)`, and how the target reads in an error."""
    if config.target_macs is not None:
        return (lambda plan: macs_fraction(plan, geometry) <= config.target_macs), f"--target-macs {config.target_macs}"
    return budget.fits, f"{budget.target_ms:.4g} ms on {budget.table.label}"


def structure_plan(base: SlimPlan, static: int, stages, geometry: ViTGeometry, grid: tuple[int, int]) -> SlimPlan:
    """The plan's shape for `static` blocks and pyramid `stages`: uniform static attention and
    average-pooling aggregation (fine-tuning changes these values, never the shapes or the MACs)."""
    uniform = torch.full((geometry.num_heads, geometry.num_tokens, geometry.num_tokens), 1.0 / geometry.num_tokens)
    return glad_plan(base, dict.fromkeys(range(static), uniform), initial_aggregations(stages, grid))


def initial_aggregations(stages, grid: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Average-pooling matrices for each pyramid stage, each pooling the previous stage's grid."""
    matrices = {}
    for block, count in stages:
        matrices[block], grid = pooling_matrix(grid, count)
    return matrices


def structures_meeting(
    analysis: list[dict], max_static: int, geometry: ViTGeometry, grid: tuple[int, int], plan_fits, target_name: str
) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """(static blocks, the auto pyramid) for each count 0..max_static whose steepest pyramid meets
    the target (`plan_fits(static, stages)`); counts that cannot are left out."""
    found = []
    for static in range(max_static + 1):
        if plan_fits(static, steepest_pyramid(analysis, static, grid)):
            stages = auto_pyramid(analysis, static, geometry, grid, functools.partial(plan_fits, static), target_name)
            found.append((static, stages))
    if not found:
        raise PruningError(
            f"{target_name}: even {max_static} static blocks and the steepest pyramid the patch grid allows do not "
            f"meet it; raise the target or --max-static-blocks (at most the depth, {geometry.depth})"
        )
    return found


def structure_search(
    start_model: MaskedReference,
    found: list[tuple[int, tuple[tuple[int, int], ...]]],
    shape_of,
    initialised_of,
    images: torch.Tensor,
    batch_size: int,
    budget: Optional[LatencyBudget],
) -> list[dict]:
    """One row per structure `found` (static blocks, pyramid): its MACs, predicted latency (with a
    table) and prediction divergence as initialised (`initialised_of(static, stages)`: the plan
    fine-tuning starts from). `shape_of(static, stages)` is the structure's plan for the costs.
    `start_model`: the model the structures are cut from, frozen, under its start plan."""
    model = start_model.model
    geometry = supported_geometry(model)
    with torch.no_grad():
        reference_logits = torch.cat([start_model(chunk) for chunk in images.split(batch_size)])
    rows = []
    for static, stages in found:
        shape = shape_of(static, stages)
        divergence = prediction_divergence(model, initialised_of(static, stages), images, reference_logits, batch_size)
        if not math.isfinite(divergence):
            raise PruningError(
                f"{static} static blocks with pyramid {list(stages)} predict non-finite values on the calibration "
                "images: check the model's weights (vitslim eval on the dense run)"
            )
        rows.append(
            {
                "static_blocks": static,
                "pyramid": [list(stage) for stage in stages],
                "macs_fraction": macs_fraction(shape, geometry),
                **({} if budget is None else {"predicted_ms": budget.predicted_ms(shape)}),
                "divergence": divergence,
            }
        )
    return rows


def prediction_divergence(
    model: nn.Module, plan: SlimPlan, images: torch.Tensor, reference_logits: torch.Tensor, batch_size: int
) -> float:
    """KL(the start model's predictions, `reference_logits` ‖ the plan's) per image on `images`:
    how far a structure, as initialised, is from the model it is cut from, which is what
    fine-tuning's distillation then has to close. `model` is the timm model in eval mode."""
    with torch.no_grad(), plan_applied(model, plan, check=False):
        logits = torch.cat([model(chunk) for chunk in images.split(batch_size)])
    return float(
        F.kl_div(logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    )


def auto_structure(
    start_model: MaskedReference,
    config: DGSSAGladConfig,
    budget: Optional[LatencyBudget],
    analysis: list[dict],
    mean_maps: dict[int, torch.Tensor],
    images: torch.Tensor,
    static: int,
    grid: tuple[int, int],
) -> tuple[int, tuple[tuple[int, int], ...], list[dict]]:
    """--pyramid auto: (static blocks, stages, the search's rows). The pyramid that meets the
    target after the `static` blocks the settings fix or, with --max-static-blocks, the structure
    of least prediction divergence among those that meet it for each count (`images`: the
    calibration images the divergence is measured on; `start_model`: the model under its start
    plan, which the structures extend)."""
    base = start_model.plan
    geometry = supported_geometry(start_model.model)
    fits, target_name = pyramid_target(config, budget, geometry)

    def shape_of(count, candidate) -> SlimPlan:
        return structure_plan(base, count, candidate, geometry, grid)

    def initialised_of(count, candidate) -> SlimPlan:
        static_maps = {b: logits.softmax(dim=-1) for b, logits in start_logits(mean_maps, count, config).items()}
        return glad_plan(base, static_maps, initial_aggregations(candidate, grid))

    if config.max_static_blocks is None:
        stages = auto_pyramid(
            analysis, static, geometry, grid, lambda candidate: fits(shape_of(static, candidate)), target_name
        )
        return static, stages, []
    found = structures_meeting(
        analysis,
        config.max_static_blocks,
        geometry,
        grid,
        lambda count, candidate: fits(shape_of(count, candidate)),
        target_name,
    )
    search = structure_search(start_model, found, shape_of, initialised_of, images, config.batch_size, budget)
    best = min(range(len(found)), key=lambda i: search[i]["divergence"])  # ties: the fewer static blocks
    for i, row in enumerate(search):
        row["chosen"] = i == best
    return (*found[best], search)


@register_method("dgssa-glad", "DGSSA + GLAD", DGSSAGladConfig, decides=TOKEN_FIELDS)
def prune_dgssa_glad(
    model: nn.Module,
    data: DataSplits,
    config: DGSSAGladConfig,
    base: SlimPlan,
    checkpoints: Optional[Path] = None,
) -> MethodResult:
    """Analyse attention, make early blocks static and late stages aggregated, fine-tune. `model` is not modified."""
    geometry, start_model = start(model, base, "dgssa-glad")
    check_static_blocks(config, geometry.depth)
    budget = LatencyBudget.from_settings(config, geometry, base)  # a bad table fails before the analysis
    auto = config.pyramid.strip() == AUTO
    stages = () if auto else parse_pyramid(config.pyramid)
    check_pyramid(stages, geometry)
    calibration = calibration_set(data.train, config.calibration_images, config.seed)
    analysis, mean_maps = analyse_attention(start_model, calibration.images, config.batch_size)
    static = static_block_count(config, analysis, geometry.depth)
    grid = patch_grid(model)
    search = []
    if auto:
        static, stages, search = auto_structure(
            start_model, config, budget, analysis, mean_maps, calibration.images, static, grid
        )
        check_pyramid(stages, geometry)
    if stages and static > stages[0][0]:
        raise PruningError(
            f"static blocks 0..{static - 1} overlap the first pyramid stage at block {stages[0][0]}: static attention is for early blocks"
        )
    trainable = _Trainable(
        copy.deepcopy(model),
        base,
        start_logits(mean_maps, static, config),
        initial_aggregations(stages, grid),
        start_model.model,
    )
    report = {
        "config": asdict(config),
        "pyramid_from": "effective rank (--pyramid auto)" if auto else "--pyramid",
        "calibration_classes": calibration.class_histogram,
        "analysis": analysis,
        "static_blocks": static,
        "pyramid": [list(s) for s in stages],
        **({"structure_search": search} if search else {}),
        **({} if budget is None else {"latency": budget.report(structure_plan(base, static, stages, geometry, grid))}),
        "top1_start": evaluate(start_model, data.val),
    }
    trainable.eval()
    report["top1_before_finetune"] = evaluate(trainable, data.val)
    constants = list(trainable.logits.parameters()) + list(trainable.aggregations.parameters())
    groups = [
        {"params": [p for p in trainable.model.parameters() if p.requires_grad], "weight_decay": 0.0},
        {"params": constants, "lr": config.static_lr, "weight_decay": 0.0},
    ]
    train = TrainConfig(
        epochs=config.finetune_epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        distill_weight=config.distill_weight,
        seed=config.seed,
        warmup_epochs=0,
        **config.augmentation_settings(),
    )
    finetune = fit(
        trainable,
        data,
        train,
        teacher=start_model,
        groups=groups,
        extra_loss=lambda: config.attention_weight * trainable.attention_loss,
        checkpoint_path=phase_path(checkpoints, "finetune"),
        resume_key={"start": plan_digest(base)},  # the start plan is hooks, not weights
    )
    with torch.no_grad():
        plan = trainable.plan()
        plan = SlimPlan(
            model=plan.model,
            blocks=tuple(
                replace(
                    b,
                    token_aggregation=None if b.token_aggregation is None else b.token_aggregation.detach().clone(),
                    static_attention=None if b.static_attention is None else b.static_attention.detach().clone(),
                )
                for b in plan.blocks
            ),
            method=plan.method,
        )
    report.update(
        top1_after_finetune=finetune.val_top1 if config.finetune_epochs else report["top1_before_finetune"],
        history={"finetune": list(finetune.history)},
        augmentation=finetune.augmentation,  # what the fine-tuning applied ("auto" resolved)
    )
    return MethodResult(
        plan=plan, model=trainable.model.cpu().eval(), top1=report["top1_after_finetune"], report=report
    )
