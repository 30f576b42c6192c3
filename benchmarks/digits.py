"""Accuracy at matched MACs on the built-in digits model (CPU): ToMe without training against
Patch Slimming (its search alone on the dense weights, after the search's block tuning, after its
default fine-tuning), all from the same dense checkpoint; and the DGSSA + GLAD structure that
reached the paper's 2.21x on the GPU, mapped to the digits model and fine-tuned as the method does.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from vitslim.pruning.macs import macs_fraction
from vitslim.pruning.reference import MaskedReference
from vitslim.pruning.run_dir import load_run
from vitslim.pruning.timm_adapter import geometry_of
from vitslim.pruning.train import evaluate

from vitslim.pipeline import data_for, prune_model, train_run
from vitslim.recipe import load_recipe

from .operating_points import DGSSA_ISSUE_10, DGSSA_LADDER, DGSSAStructure
from .tome import ToMe, schedule_for_macs, tome_macs

DGSSA_TARGET = 2.21  # the paper's throughput claim
DGSSA_TARGET_MODEL, DGSSA_TARGET_BATCH = "deit_small_patch16_224", 256


def fastest_needed_dgssa(gpu: dict) -> tuple[DGSSAStructure, dict]:
    """The least aggressive ladder structure that reached DGSSA_TARGET on the GPU (DeiT-S, batch
    256, CUDA graphs; `gpu` is gpu.json), or the fastest one measured if none did; with its row."""
    rows = gpu["rows"]
    by_variant = {
        r["variant"]: r
        for r in rows
        if r["model"] == DGSSA_TARGET_MODEL and r["batch"] == DGSSA_TARGET_BATCH and r["mode"] == "cuda_graph"
    }
    measured = [(s, by_variant[s.name()]) for s in DGSSA_LADDER if s.name() in by_variant]
    if not measured:
        raise SystemExit(
            f"the GPU results have no DGSSA ladder rows for {DGSSA_TARGET_MODEL} at batch {DGSSA_TARGET_BATCH}: run --gpu first"
        )
    reaching = [(s, r) for s, r in measured if r["speedup"] >= DGSSA_TARGET]
    return reaching[0] if reaching else max(measured, key=lambda item: item[1]["speedup"])


def _dgssa_config(config, structure: DGSSAStructure, geometry):
    pyramid = ",".join(f"{block}:{count}" for block, count in structure.pyramid(geometry))
    return replace(
        config,
        static_blocks=structure.static_blocks(geometry),
        pyramid=pyramid,
        target_macs=None,
        similarity_threshold=None,
    )


def seed_study(work: Path, seed: int, dgssa_fast: DGSSAStructure, progress=print) -> dict:
    recipe = load_recipe(None).with_seed(seed)
    methods = dict(recipe.methods)
    dense_dir = work / f"seed{seed}" / "dense"
    started = time.perf_counter()
    if not (dense_dir / "plan.json").exists():
        progress(f"[digits seed {seed}] training the dense model")
        train_run(recipe.model, recipe.data, recipe.train, dense_dir)
    dense_plan, model = load_run(dense_dir)
    data = data_for(model, recipe.data)
    geometry = geometry_of(model)
    result = {"seed": seed, "dense_top1": evaluate(model, data.val)}

    progress(f"[digits seed {seed}] Patch Slimming, the recipe's settings")
    slim = prune_model("patch-slim", methods["patch-slim"], dense_plan, model, data)
    slim_fraction = macs_fraction(slim.plan, geometry)
    result["patch_slim"] = {
        "macs_fraction": slim_fraction,
        "epsilon": slim.report["epsilon"],
        "top1_search_only_dense_weights": evaluate(MaskedReference(model, slim.plan), data.val),
        "top1_after_search": slim.report["top1_after_search"],
        "top1_after_finetune": slim.report["top1_after_finetune"],
        "finetune_epochs": methods["patch-slim"].finetune_epochs,
    }
    schedule = schedule_for_macs(int(slim_fraction * tome_macs([0] * geometry.depth, geometry)), geometry)
    dense_macs = tome_macs([0] * geometry.depth, geometry)
    result["tome"] = {
        "schedule": list(schedule),
        "macs_fraction": tome_macs(schedule, geometry) / dense_macs,
        "top1": evaluate(ToMe(model, schedule), data.val),
    }
    progress(
        f"[digits seed {seed}] Patch Slimming {slim_fraction:.1%} MACs: {result['patch_slim']['top1_after_finetune']:.2f} %; "
        f"ToMe {result['tome']['macs_fraction']:.1%}: {result['tome']['top1']:.2f} %"
    )

    result["dgssa_glad"] = {}
    for label, structure in (("issue-10 structure", DGSSA_ISSUE_10), ("fastest needed for 2.21x", dgssa_fast)):
        config = _dgssa_config(methods["dgssa-glad"], structure, geometry)
        progress(
            f"[digits seed {seed}] DGSSA + GLAD {structure.name()} -> static {config.static_blocks}, pyramid {config.pyramid}"
        )
        pruned = prune_model("dgssa-glad", config, dense_plan, model, data)
        result["dgssa_glad"][label] = {
            "structure": structure.name(),
            "static_blocks": config.static_blocks,
            "pyramid": config.pyramid,
            "macs_fraction": macs_fraction(pruned.plan, geometry),
            "finetune_epochs": config.finetune_epochs,
            "top1_before_finetune": pruned.report["top1_before_finetune"],
            "top1_after_finetune": pruned.report["top1_after_finetune"],
        }
    result["dgssa_ablation"] = dgssa_ablation(model, dense_plan, data, methods["dgssa-glad"], geometry, progress)
    result["seconds"] = time.perf_counter() - started
    return result


ABLATION = (  # (label, static_init, attention_weight)
    ("mean-attention start, no guidance term", "mean-attention", 0.0),
    ("mean-attention start + guidance (the default)", "mean-attention", None),
    ("random start + guidance", "random", None),
    ("random start, no guidance term", "random", 0.0),
)


def dgssa_ablation(model, dense_plan, data, config, geometry, progress=print) -> list[dict]:
    """DGSSA + GLAD with the recipe's structure, varying only where the static maps start and
    whether the guidance term is on: what each part of the guidance contributes. kl_to_dense_maps:
    the guidance divergence of the final static maps from the dense model's on 256 validation
    images, averaged over the static blocks."""
    import torch
    from vitslim.pruning.data import calibration_set
    from vitslim.pruning.methods.dgssa_glad import attention_divergence
    from vitslim.pruning.reference import recorded_attention

    images = calibration_set(data.val, 256).images
    with torch.no_grad(), recorded_attention(model) as records:
        model(images)
    dense_maps = {block: record["attention"] for block, record in records.items()}
    rows = []
    for label, start, weight in ABLATION:
        variant = replace(
            config, static_init=start, attention_weight=config.attention_weight if weight is None else weight
        )
        progress(f"[digits] DGSSA ablation: {label}")
        pruned = prune_model("dgssa-glad", variant, dense_plan, model, data)
        static = [b for b, block in enumerate(pruned.plan.blocks) if block.static_attention is not None]
        divergence = sum(
            float(attention_divergence(pruned.plan.blocks[b].static_attention, dense_maps[b])) for b in static
        ) / max(1, len(static))
        rows.append(
            {
                "variant": label,
                "static_init": start,
                "attention_weight": variant.attention_weight,
                "top1_before_finetune": pruned.report["top1_before_finetune"],
                "top1_after_finetune": pruned.report["top1_after_finetune"],
                "kl_to_dense_maps": divergence,
                "macs_fraction": macs_fraction(pruned.plan, geometry),
            }
        )
    return rows


def digits_study(work: Path, seeds: list[int], gpu_results: Path, progress=print) -> dict:
    if not gpu_results.exists():
        raise SystemExit(
            f"no {gpu_results}: the DGSSA + GLAD structure to train is chosen from the GPU results (python -m benchmarks --gpu)"
        )
    dgssa_fast, gpu_row = fastest_needed_dgssa(json.loads(gpu_results.read_text()))
    return {
        "recipe": "built-in default (vitslim/recipe.py)",
        "dgssa_fast": {"structure": dgssa_fast.name(), "gpu": gpu_row},
        "seeds": [seed_study(work, seed, dgssa_fast, progress) for seed in seeds],
    }
