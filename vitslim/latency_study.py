"""GPU latency study: PyTorch dense vs compact DeiT for the structure each method produces.

`python -m vitslim.latency_study --out DIR [--model deit_small_patch16_224] [--device cuda]`
writes run directories with random weights (latency does not depend on them) for: dense, VTP at
40 % (uniform cut), a Patch-Slimming schedule, DGSSA (4 static blocks) + GLAD (7:98,10:49), then
times each compact module against the dense model in the same run (CUDA graphs, fp16, batch 1
and 64 by default) and writes DIR/latency.json and DIR/latency.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deploy.bench import BenchSettings
from deploy.files import write_json_atomic
from pruning.atomic import write_text_atomic
from pruning.dgssa_glad import pooling_matrix
from pruning.macs import plan_macs
from pruning.models import create_model
from pruning.patch_slimming import plan_from_token_sets
from pruning.plan import BlockPlan, ModelSpec, SlimPlan, dense_plan
from pruning.run_dir import save_run
from pruning.timm_adapter import geometry_of, patch_grid
from pruning.vtp import VTPConfig, VTPGates, plan_from_gates

from .measure import BenchSpec, run_bench

# tokens output per block, as a fraction of the dense count (a Patch-Slimming-like pyramid)
PATCH_SLIM_SCHEDULE = (1.0, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.28, 0.2, 0.12, 0.0)


def structure_plans(model: torch.nn.Module, spec: ModelSpec) -> dict[str, SlimPlan]:
    geometry = geometry_of(model)
    depth, prefix = geometry.depth, geometry.num_prefix_tokens
    plans = {"dense": dense_plan(spec, depth)}
    plans["vtp"] = plan_from_gates(VTPGates(geometry).as_dict(), geometry, plans["dense"], VTPConfig(prune_ratio=0.4, round_to=8))
    generator = torch.Generator().manual_seed(0)
    order = (torch.randperm(geometry.num_patches, generator=generator) + prefix).tolist()
    schedule = [PATCH_SLIM_SCHEDULE[min(b * len(PATCH_SLIM_SCHEDULE) // depth, len(PATCH_SLIM_SCHEDULE) - 1)] for b in range(depth)]
    sets = [tuple(range(prefix)) + tuple(sorted(order[: int(round(f * geometry.num_patches))])) for f in schedule]
    plans["patch-slim"] = plan_from_token_sets(sets, plans["dense"], geometry.num_tokens)
    static, stages = min(4, depth // 3), [(depth * 7 // 12, geometry.num_patches // 2), (depth * 10 // 12, geometry.num_patches // 4)]
    blocks = list(plans["dense"].blocks)
    for b in range(static):
        blocks[b] = BlockPlan(static_attention=torch.full((geometry.num_heads, geometry.num_tokens, geometry.num_tokens), 1.0 / geometry.num_tokens))
    grid = patch_grid(model)
    for block, count in stages:
        matrix, grid = pooling_matrix(grid, count)
        blocks[block] = BlockPlan(token_aggregation=matrix)
    plans["dgssa-glad"] = SlimPlan(model=spec, blocks=tuple(blocks), method="dgssa-glad")
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitslim.latency_study")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", default="cuda_graph", choices=("eager", "cuda_graph"))
    parser.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch", type=int, action="append")
    args = parser.parse_args(argv)
    out = Path(args.out)
    spec = ModelSpec(args.model)
    torch.manual_seed(0)
    model = create_model(spec)
    geometry = geometry_of(model)
    dense_macs = plan_macs(dense_plan(spec, geometry.depth), geometry)["total"]
    rows = []
    for name, plan in structure_plans(model, spec).items():
        save_run(out / name, plan, model)
        report = run_bench(BenchSpec(artifact=str(out / name), backend="torch", device=args.device, batches=tuple(args.batch or [1, 64]),
                                     run_dir=str(out / name), torch_mode=args.mode, torch_dtype=args.dtype), BenchSettings(min_seconds=3.0))
        dense = {r["batch"]: r for r in report["results"] if r["label"] == "torch:dense"}
        compact = {r["batch"]: r for r in report["results"] if r["label"] == "torch:compact"}
        for batch in sorted(compact):
            rows.append({"variant": name, "batch": batch, "macs_fraction": plan_macs(plan, geometry)["total"] / dense_macs,
                         "dense_ms": dense[batch]["median_ms"], "compact_ms": compact[batch]["median_ms"],
                         "compact_p90_ms": compact[batch]["p90_ms"], "dense_cov": dense[batch]["cov"], "compact_cov": compact[batch]["cov"],
                         "speedup": dense[batch]["median_ms"] / compact[batch]["median_ms"], "fingerprint": compact[batch]["fingerprint"]})
    write_json_atomic(out / "latency.json", {"model": args.model, "rows": rows})
    gpu = rows[0]["fingerprint"]["runner"].get("gpu") if rows else None
    lines = [f"# {args.model}: PyTorch {args.dtype} ({args.mode}) latency on {gpu}", "",
             "| variant | MACs vs dense | batch | dense median ms | compact median ms (p90) | speed-up | MAC-ideal |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['macs_fraction']:.1%} | {r['batch']} | {r['dense_ms']:.3f} | {r['compact_ms']:.3f} ({r['compact_p90_ms']:.3f}) | "
              f"{r['speedup']:.2f}x | {1 / r['macs_fraction']:.2f}x |" for r in rows]
    write_text_atomic(out / "latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
