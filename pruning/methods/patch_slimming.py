"""Patch Slimming (Tang et al., CVPR 2022): top-down, data-driven token pruning with nested masks.

The last block outputs only the prefix tokens. Going down (t = L-2 ... 0), block t's output set
S_t grows from S_{t+1} by the tokens with the largest impact score (attention propagated through
the later, already slimmed blocks times the token's feature energy, averaged over calibration
images), r' at a time, until block t+1's output on its kept rows is reconstructed within ε after
fine-tuning block t alone. Then the whole slimmed model is fine-tuned.

Token sets are kept as original token ids (sorted; prefix tokens first); the plan stores each
block's set as positions within the previous block's set, so the masks are nested by construction.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.core.settings import setting

from ..checkpoints import load_state, phase_path, save_state, weights_digest
from ..data import DataSplits, calibration_set
from ..errors import PruningError
from ..latency import LatencyBudget, LatencyTargetSettings
from ..macs import macs_fraction
from ..plan import SlimPlan, plan_digest
from ..reference import MaskedReference, blocks_applied, plan_applied, recorded_attention
from ..timm_adapter import ViTGeometry, blocks_of
from ..train import AugmentationSettings, TrainConfig, evaluate, fit, is_main_process
from .base import TOKEN_FIELDS, MethodResult, composed_name, register_method, start

log = logging.getLogger(__name__)
TokenSets = list[tuple[int, ...]]  # per block: the original token ids it outputs
# The search is top-down from the tokens the head reads: with a class token that is one token,
# with a pooled head every token, and nested sets can then never drop one.
POOLED_HEAD_REFUSAL = (
    "Patch Slimming needs a class-token head: the top-down search starts from the tokens the head reads, "
    "and an average-pooled head reads every token; create the model with global_pool='token' (and a class token)"
)


@dataclass(frozen=True)
class PatchSlimConfig(AugmentationSettings, LatencyTargetSettings):
    epsilon: Optional[float] = setting(
        None, "tolerance on the next block's relative squared reconstruction error (paper 0.01-0.02)"
    )
    target_macs: Optional[float] = setting(
        None, "instead of epsilon: the fraction of dense MACs to keep (bisection on epsilon)"
    )
    step: int = setting(10, "r': tokens added per search step (paper 10)")
    block_epochs: int = setting(3, "epochs of single-block fine-tuning per candidate set")
    block_lr: float = setting(1e-4, "learning rate of the single-block fine-tuning")
    finetune_epochs: int = setting(10, "epochs of fine-tuning after the search")
    lr: float = setting(5e-4, "learning rate of the weights")
    batch_size: int = setting(64, "batch size")
    calibration_images: int = setting(
        256, "training images (stratified, seeded) that score tokens and check ε; the block tuning never sees them"
    )
    block_tuning_images: int = setting(
        256, "further training images (stratified, seeded) that the single-block fine-tuning uses"
    )
    distill_weight: float = setting(0.5, "weight of logit distillation from the model it starts from, in [0, 1]")
    search_iterations: int = setting(8, "bisection steps on epsilon for --target-macs or a latency target")
    seed: int = setting(0, "random seed")

    def __post_init__(self) -> None:
        super().__post_init__()  # the augmentation settings; every float finite
        self.check_latency_settings()
        if (self.epsilon is not None) + (self.target_macs is not None) + self.has_latency_target != 1:
            raise PruningError(
                "give exactly one of --epsilon E (e.g. 0.02), --target-macs F (e.g. 0.55) or a latency target "
                "(--target-ms / --target-speedup with --latency-table)"
            )
        if self.epsilon is not None and not self.epsilon > 0:
            raise PruningError(f"--epsilon {self.epsilon} must be > 0 (the paper uses 0.01-0.02)")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise PruningError(
                f"--target-macs {self.target_macs} must be in (0, 1]: the fraction of dense MACs to keep"
            )
        if self.step < 1 or self.block_epochs < 0 or self.finetune_epochs < 0:
            raise PruningError("--step must be >= 1 and epoch counts >= 0")
        if self.calibration_images < 1 or self.block_tuning_images < 1:
            raise PruningError("--calibration-images and --block-tuning-images must be >= 1")


# ------------------------------------------------------------------------------ pure score math


def path_energy(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over head paths π of ||A_π[:, i]||², by a backward recursion over the later blocks.

    attentions[j]: [B, H, N_out_j, N_in_j] (kept query rows of block t+1+j, all its key columns),
    with N_in_{j+1} = N_out_j. A_π is the product of one head per block. Returns [B, N_in_0].
    K_{L} = I; K_l = Σ_h P_lᵀ K_{l+1} P_l; the answer is diag(K_{t+1}).
    """
    last = attentions[-1]
    energy = torch.eye(last.shape[2], dtype=last.dtype, device=last.device).expand(last.shape[0], -1, -1)
    for probs in reversed(attentions):
        energy = torch.einsum("bhoi,bop,bhpj->bij", probs, energy, probs)
    return torch.diagonal(energy, dim1=1, dim2=2)


def path_energy_brute_force(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The same sum by enumerating all H^(number of blocks) head paths (tests only)."""
    heads = attentions[0].shape[1]
    total = 0
    for path in itertools.product(range(heads), repeat=len(attentions)):
        product = attentions[-1][:, path[-1]]
        for probs, head in zip(reversed(attentions[:-1]), reversed(path[:-1])):
            product = product @ probs[:, head]
        total = total + product.pow(2).sum(dim=1)
    return total


def feature_energy(attention: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
    """Σ_h ||(P_h |Z|)[i, :]||² per token: attention [B, H, N, N], block input Z [B, N, C] -> [B, N]."""
    return (attention @ block_input.abs().unsqueeze(1)).pow(2).sum(dim=(1, 3))


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """||estimate - target||² / ||target||² (the ε of the search; sums over all rows and images)."""
    return float((estimate - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))


# ------------------------------------------------------------------------------ token sets <-> plan


def plan_from_token_sets(token_sets: TokenSets, base: SlimPlan, num_tokens: int) -> SlimPlan:
    """`base` where each block keeps the positions of its set within the previous block's set
    (None if equal)."""
    blocks, previous = [], tuple(range(num_tokens))
    for block, kept in zip(base.blocks, token_sets):
        position = {token: p for p, token in enumerate(previous)}
        kept_tokens = None if kept == previous else tuple(position[token] for token in kept)
        blocks.append(replace(block, kept_tokens=kept_tokens))
        previous = kept
    return SlimPlan(model=base.model, blocks=tuple(blocks), method=composed_name(base, "patch-slim"))


def ranked_candidates(scores: torch.Tensor, kept: Sequence[int], num_prefix: int) -> list[int]:
    """Token ids not yet kept (and not prefix), by decreasing score."""
    taken = set(kept)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [token for token in order if token >= num_prefix and token not in taken]


# ------------------------------------------------------------------------------ the search


@dataclass
class _Search:
    """State of one top-down search: the student, the teacher's cached features, the token sets."""

    student: nn.Module
    geometry: ViTGeometry
    base: SlimPlan
    images: torch.Tensor  # calibration images: they score tokens and check ε
    check: "_Features"  # the teacher (the start model) on the calibration images
    tuning: "_Features"  # the teacher on the block-tuning images (disjoint from the above)
    config: PatchSlimConfig

    def sets_with_dense_below(self, token_sets: TokenSets, t: int) -> TokenSets:
        """Blocks <= t keep every token (they are not decided yet)."""
        everything = tuple(range(self.geometry.num_tokens))
        return [everything if b <= t else token_sets[b] for b in range(self.geometry.depth)]

    def scores(self, token_sets: TokenSets, t: int) -> torch.Tensor:
        """Mean impact score [N] of block t's output tokens, blocks > t using their sets."""
        sets = self.sets_with_dense_below(token_sets, t)
        plan = plan_from_token_sets(sets, self.base, self.geometry.num_tokens)
        totals = torch.zeros(self.geometry.num_tokens, dtype=torch.float64)
        with torch.no_grad(), plan_applied(self.student, plan), recorded_attention(self.student) as records:
            for chunk in self.images.split(self.config.batch_size):
                self.student(chunk)
                later = [
                    records[b]["attention"][
                        :, :, list(plan.blocks[b].kept_tokens or range(records[b]["attention"].shape[2]))
                    ]
                    for b in range(t + 1, self.geometry.depth)
                ]
                score = path_energy(later) * feature_energy(records[t]["attention"], records[t]["input"])
                totals += score.sum(dim=0).double()
        return totals / len(self.images)

    def two_blocks(self, sets: TokenSets, t: int):
        """Block t (reading all tokens, writing sets[t]) then block t+1 (writing sets[t+1])."""
        plan = plan_from_token_sets(sets, self.base, self.geometry.num_tokens)
        blocks = list(blocks_of(self.student))
        return blocks[t], blocks[t + 1], (plan.blocks[t], plan.blocks[t + 1])

    def reconstruction(self, sets: TokenSets, t: int) -> float:
        """Fine-tune block t on the tuning images so that block t+1 reproduces the teacher on its
        kept rows; return the relative error on the calibration images (held out from the tuning)."""
        block_t, block_next, plans = self.two_blocks(sets, t)
        rows = list(sets[t + 1])
        with blocks_applied([block_t, block_next], plans, self.geometry.num_prefix_tokens):
            if self.config.block_epochs > 0:
                self._fit_block(block_t, block_next, self.tuning.inputs[t], self.tuning.outputs[t + 1][:, rows])
            with torch.no_grad():
                estimate = torch.cat(
                    [block_next(block_t(x)) for x in self.check.inputs[t].split(self.config.batch_size)]
                )
        return relative_error(estimate, self.check.outputs[t + 1][:, rows])

    def _fit_block(self, block_t: nn.Module, block_next: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> None:
        for p in block_next.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(block_t.parameters(), lr=self.config.block_lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.config.seed)
        block_t.train()
        for _ in range(self.config.block_epochs):
            for batch in torch.randperm(len(inputs), generator=generator).split(self.config.batch_size):
                loss = F.mse_loss(block_next(block_t(inputs[batch])), target[batch])
                if not torch.isfinite(loss):  # else the error turns NaN and the search silently keeps every token
                    raise PruningError(
                        f"Patch Slimming's block tuning diverged (loss {float(loss)}): lower --block-lr "
                        f"(now {self.config.block_lr:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        block_t.eval()
        for p in block_next.parameters():
            p.requires_grad_(True)

    def choose_set(self, token_sets: TokenSets, t: int, epsilon: float) -> tuple[tuple[int, ...], list[dict]]:
        """Grow S_t from S_{t+1} until block t+1's error <= epsilon; keep block t's fine-tuned weights."""
        base_set = token_sets[t + 1]
        candidates = ranked_candidates(self.scores(token_sets, t), base_set, self.geometry.num_prefix_tokens)
        original = copy.deepcopy(blocks_of(self.student)[t].state_dict())
        tried = []
        for count in range(0, len(candidates) + self.config.step, self.config.step):
            kept = tuple(sorted(set(base_set) | set(candidates[:count])))
            blocks_of(self.student)[t].load_state_dict(original)
            sets = self.sets_with_dense_below(token_sets, t)
            sets[t] = kept
            error = self.reconstruction(sets, t)
            if not math.isfinite(error):
                raise PruningError(
                    f"Patch Slimming: block {t + 1}'s reconstruction error is {error}: check the weights and --block-lr"
                )
            tried.append({"tokens": len(kept), "error": error})
            if error <= epsilon or count >= len(candidates):
                return kept, tried
        raise AssertionError("unreachable: the last candidate set keeps every token")

    def run(self, epsilon: float) -> tuple[TokenSets, list[dict]]:
        """The whole top-down search for one epsilon; returns token sets and a log per block."""
        from tqdm import tqdm

        depth = self.geometry.depth
        token_sets: TokenSets = [tuple(range(self.geometry.num_tokens))] * depth
        token_sets[depth - 1] = tuple(range(self.geometry.num_prefix_tokens))
        search_log = []
        for t in tqdm(range(depth - 2, -1, -1), desc=f"patch slimming (ε={epsilon:.3g})", leave=False, disable=None):
            token_sets[t], tried = self.choose_set(token_sets, t, epsilon)
            search_log.append({"block": t, "kept": len(token_sets[t]), "tried": tried})
            log.info("block %d keeps %d tokens (error %.4f)", t, len(token_sets[t]), tried[-1]["error"])
        return token_sets, search_log


@dataclass(frozen=True)
class _Features:
    """The teacher's input and output of every block [B, N, C] on a set of images."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def _teacher_features(teacher: MaskedReference, images: torch.Tensor, batch_size: int) -> _Features:
    """Every block's input and output on `images` in the teacher (the start model)."""
    inputs: dict[int, list] = {}
    outputs: dict[int, list] = {}

    def record(index: int):
        def hook(module, args, output) -> None:
            inputs.setdefault(index, []).append(args[0])
            outputs.setdefault(index, []).append(output)

        return hook

    model = teacher.model
    with torch.no_grad(), plan_applied(model, teacher.plan, check=False):
        # after the plan's hooks, so that a block's output is recorded as the plan leaves it
        handles = [block.register_forward_hook(record(index)) for index, block in enumerate(blocks_of(model))]
        try:
            for chunk in images.split(batch_size):
                model(chunk)
        finally:
            for handle in handles:
                handle.remove()
    depth = len(blocks_of(model))
    return _Features([torch.cat(inputs[i]) for i in range(depth)], [torch.cat(outputs[i]) for i in range(depth)])


def _search_for_target(make_search, geometry: ViTGeometry, base: SlimPlan, config: PatchSlimConfig, fits):
    """Bisection on log ε: the smallest ε (the least reconstruction error, the method's own
    accuracy proxy) whose plan `fits` the target (MACs or predicted latency)."""
    low, high = math.log(1e-4), math.log(4.0)
    best = None
    for _ in range(config.search_iterations):
        epsilon = math.exp((low + high) / 2)
        search = make_search()
        token_sets, search_log = search.run(epsilon)
        if fits(plan_from_token_sets(token_sets, base, geometry.num_tokens)):
            high, best = math.log(epsilon), (epsilon, search, token_sets, search_log)
        else:
            low = math.log(epsilon)
    if best is None:
        epsilon = math.exp(high)
        search = make_search()
        best = (epsilon, search, *search.run(epsilon))
    return best


@register_method("patch-slim", "Patch Slimming", PatchSlimConfig, decides=TOKEN_FIELDS)
def prune_patch_slimming(
    model: nn.Module,
    data: DataSplits,
    config: PatchSlimConfig,
    base: SlimPlan,
    checkpoints: Optional[Path] = None,
) -> MethodResult:
    """Top-down token search (fixed ε, a MAC target or a latency target), then full fine-tuning.
    `model` is not modified."""
    geometry, teacher = start(model, base, "patch-slim")
    budget = LatencyBudget.from_settings(config, geometry, base)
    if geometry.pools_patch_tokens or not geometry.num_prefix_tokens:
        raise PruningError(POOLED_HEAD_REFUSAL)
    needed = config.calibration_images + config.block_tuning_images
    if len(data.train) < needed:
        raise PruningError(
            f"Patch Slimming draws {config.calibration_images} calibration + {config.block_tuning_images} block-tuning images, "
            f"but the training data has {len(data.train)}: lower --calibration-images / --block-tuning-images"
        )
    torch.manual_seed(config.seed)
    check, tuning = calibration_set(data.train, needed, config.seed).split(config.calibration_images)
    check_features, tuning_features = (_teacher_features(teacher, s.images, config.batch_size) for s in (check, tuning))

    def make_search() -> _Search:
        return _Search(
            copy.deepcopy(model).eval(), geometry, base, check.images, check_features, tuning_features, config
        )

    search_path, search_settings = (
        phase_path(checkpoints, "search"),
        {
            "config": asdict(config),
            "data": data.source,
            "start": weights_digest(model),
            "start_plan": plan_digest(base),
            # a table measured again at the same path is another target
            "latency_table": None if budget is None else budget.table.sha256,
        },
    )
    found = load_state(search_path, search_settings)
    if found is not None:  # the search of an interrupted run: its tuned weights and token sets
        student = copy.deepcopy(model).eval()
        student.load_state_dict(found["student"])
        epsilon, token_sets, search_log = (
            found["epsilon"],
            tuple(tuple(s) for s in found["token_sets"]),
            found["search_log"],
        )
    else:
        if config.target_macs is not None:
            epsilon, search, token_sets, search_log = _search_for_target(
                make_search, geometry, base, config, lambda plan: macs_fraction(plan, geometry) <= config.target_macs
            )
        elif budget is not None and budget.target_ms is not None:
            epsilon, search, token_sets, search_log = _search_for_target(
                make_search, geometry, base, config, budget.fits
            )
            chosen = plan_from_token_sets(token_sets, base, geometry.num_tokens)
            if not budget.fits(chosen):  # the search ends on its largest epsilon when nothing fits
                raise budget.unreachable(chosen, f"Patch Slimming (epsilon up to {epsilon:.3g})")
        else:
            epsilon, search = config.epsilon, make_search()
            token_sets, search_log = search.run(epsilon)
        student = search.student
        if search_path is not None and is_main_process():
            save_state(
                search_path,
                search_settings,
                {
                    "student": student.state_dict(),
                    "epsilon": epsilon,
                    "token_sets": [list(s) for s in token_sets],
                    "search_log": search_log,
                },
            )
    plan = plan_from_token_sets(token_sets, base, geometry.num_tokens)
    report = {
        "config": asdict(config),
        **({} if budget is None else {"latency": budget.report(plan)}),
        "epsilon": epsilon,
        "top1_start": evaluate(teacher, data.val),
        "calibration_classes": check.class_histogram,
        "block_tuning_classes": tuning.class_histogram,
        "calibration_indices": list(check.indices),
        "block_tuning_indices": list(tuning.indices),
    }
    masked = MaskedReference(student, plan)
    report["top1_after_search"] = evaluate(masked, data.val)
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
        masked,
        data,
        train,
        teacher=teacher,
        checkpoint_path=phase_path(checkpoints, "finetune"),
        resume_key={"plan": plan_digest(plan)},  # the token sets and the start plan are hooks, not weights
    )
    report.update(
        top1_after_finetune=finetune.val_top1 if config.finetune_epochs else report["top1_after_search"],
        kept_tokens=[len(s) for s in token_sets],
        token_sets=[list(s) for s in token_sets],
        search=search_log,
        history={"finetune": list(finetune.history)},
        augmentation=finetune.augmentation,  # what the fine-tuning applied ("auto" resolved)
    )
    return MethodResult(plan=plan, model=student.cpu().eval(), top1=report["top1_after_finetune"], report=report)
