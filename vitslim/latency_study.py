"""GPU latency study: timm's own model against vitslim's compact modules, per method structure.

    python -m vitslim.latency_study --out DIR [--model deit_small_patch16_224 --model deit_base_patch16_224]
        [--device cuda] [--dtype fp16] [--mode cuda_graph --mode compile] [--batch 1 --batch 64 --batch 256]

For each model it builds, with random weights (latency does not depend on them), the structure
each method produces: the dense plan (a check of the compact module's own overhead), VTP at 40 %
of the gated dims with the hidden-heavy cut a trained run makes (rounded to 8 and to 64, and
in the masked channel layout, to see whether channel Gathers pay), a
Patch-Slimming token pyramid (in the gather and the slice token layouts), and DGSSA (4 static blocks) + GLAD (pyramid at 7/12 and 10/12 of the
depth). Each is timed in every mode and batch beside timm's own model run the same way in the same
process; the report gives the speed-up over timm, the MAC-ideal speed-up and realised / ideal, and
writes DIR/latency.json and DIR/latency.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitslim.deploy.bench import BenchSettings, benchmark, host_description, speedup_columns
from vitslim.deploy.runners import TORCH_DTYPES, TORCH_MODES, TorchRunner
from vitslim.export.compact import compact_from_plan
from vitslim.files import write_json_atomic, write_text_atomic
from vitslim.pruning.macs import macs_fraction
from vitslim.pruning.methods.dgssa_glad import pooling_matrix
from vitslim.pruning.methods.patch_slimming import plan_from_token_sets
from vitslim.pruning.methods.vtp import VTPConfig, plan_from_gates
from vitslim.pruning.models import create_model
from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan, dense_plan
from vitslim.pruning.timm_adapter import CHANNEL_SPACES, ViTGeometry, geometry_of, patch_grid

# tokens output per block, as a fraction of the dense count (a Patch-Slimming-like pyramid)
PATCH_SLIM_SCHEDULE = (1.0, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.28, 0.2, 0.12, 0.0)
SETTINGS = BenchSettings(warmup_seconds=0.3, min_seconds=1.0, min_iterations=20, max_rounds=2)


def hidden_heavy_gates(geometry: ViTGeometry, seed: int = 0) -> dict:
    """Gate magnitudes shaped like a trained VTP run's: MLP hidden units the smallest (the paper's
    40 % DeiT-B keeps 48 M params / 10.0 GMACs, which pruning mostly hidden units reproduces), the
    other spaces larger with a small overlap, so that a few of their dims fall too."""
    generator = torch.Generator().manual_seed(seed)
    ranges = {"hidden": (0.0, 0.6), "qkv_in": (0.3, 1.0), "proj_in": (0.3, 1.0), "fc1_in": (0.3, 1.0)}
    return {
        (block, space): ranges[space][0] + (ranges[space][1] - ranges[space][0]) * torch.rand(geometry.channel_sizes[space], generator=generator)
        for block in range(geometry.depth) for space in CHANNEL_SPACES
    }


def patch_slim_plan(geometry: ViTGeometry, base: SlimPlan) -> SlimPlan:
    prefix, depth = geometry.num_prefix_tokens, geometry.depth
    order = (torch.randperm(geometry.num_patches, generator=torch.Generator().manual_seed(0)) + prefix).tolist()
    schedule = [PATCH_SLIM_SCHEDULE[min(b * len(PATCH_SLIM_SCHEDULE) // depth, len(PATCH_SLIM_SCHEDULE) - 1)] for b in range(depth)]
    sets = [tuple(range(prefix)) + tuple(sorted(order[: int(round(f * geometry.num_patches))])) for f in schedule]
    return plan_from_token_sets(sets, base, geometry.num_tokens)


def dgssa_glad_plan(model: torch.nn.Module, geometry: ViTGeometry, base: SlimPlan) -> SlimPlan:
    depth, tokens = geometry.depth, geometry.num_tokens
    blocks = list(base.blocks)
    for b in range(min(4, depth // 3)):
        blocks[b] = BlockPlan(static_attention=torch.full((geometry.num_heads, tokens, tokens), 1.0 / tokens))
    grid = patch_grid(model)
    for block, count in ((depth * 7 // 12, geometry.num_patches // 2), (depth * 10 // 12, geometry.num_patches // 4)):
        matrix, grid = pooling_matrix(grid, count)
        blocks[block] = BlockPlan(token_aggregation=matrix)
    return SlimPlan(model=base.model, blocks=tuple(blocks), method="dgssa-glad")


@dataclass(frozen=True)
class Layout:
    """How the compact module expresses the plan's selections (export/compact.py)."""

    tokens: str = "gather"
    channels: str = "gather"


def structure_plans(model: torch.nn.Module, spec: ModelSpec) -> dict[str, tuple[SlimPlan, Layout]]:
    """Variant name -> (plan, the layout of its compact module)."""
    geometry = geometry_of(model)
    dense = dense_plan(spec, geometry.depth)
    gates = hidden_heavy_gates(geometry)
    patch_slim = patch_slim_plan(geometry, dense)
    vtp = plan_from_gates(gates, geometry, dense, VTPConfig(prune_ratio=0.4, round_to=8))
    return {
        "dense plan": (dense, Layout()),
        "vtp 40% round 8": (vtp, Layout()),
        "vtp 40% round 8 masked": (vtp, Layout(channels="masked")),
        "vtp 40% round 64": (plan_from_gates(gates, geometry, dense, VTPConfig(prune_ratio=0.4, round_to=64)), Layout()),
        "patch-slim gather": (patch_slim, Layout()),
        "patch-slim slice": (patch_slim, Layout(tokens="slice")),
        "dgssa-glad": (dgssa_glad_plan(model, geometry, dense), Layout()),
    }


def _row(name: str, mode: str, variant: str, fraction: float, result: dict, baseline: str, baseline_ms: float) -> dict:
    ratios = speedup_columns(baseline_ms, result["median_ms"], fraction)
    print(f"{name} {mode} batch {result['batch']} {variant}: {result['median_ms']:.3f} ms, {ratios['speedup']:.2f}x {baseline} (ideal {ratios['mac_ideal']:.2f}x)", flush=True)
    return {"model": name, "mode": mode, "batch": result["batch"], "variant": variant, "macs_fraction": fraction,
            "median_ms": result["median_ms"], "p90_ms": result["p90_ms"], "p99_ms": result["p99_ms"], "cov": result["cov"],
            "baseline": baseline, **ratios, "setup_seconds": result["setup_seconds"], "throughput_per_s": result["throughput_per_s"]}


def _images(model: torch.nn.Module, batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, *model.patch_embed.img_size)).astype(np.float32)


def _random_model_and_structures(name: str) -> tuple[torch.nn.Module, dict[str, tuple[SlimPlan, Layout, float]]]:
    """timm's `name` with seeded random weights and its structures: variant -> (plan, layout, MACs fraction)."""
    spec = ModelSpec(name)
    torch.manual_seed(0)
    model = create_model(spec)
    geometry = geometry_of(model)
    structures = {variant: (plan, layout, macs_fraction(plan, geometry)) for variant, (plan, layout) in structure_plans(model, spec).items()}
    return model, structures


def time_model(name: str, device: str, dtype: str, modes: list[str], batches: list[int]) -> list[dict]:
    """Every structure of `name` in PyTorch against timm's model, per mode and batch, in this process."""
    model, structures = _random_model_and_structures(name)
    modules = {"timm": (model, 1.0)}
    for variant, (plan, layout, fraction) in structures.items():
        modules[variant] = (compact_from_plan(model, plan, layout.tokens, layout.channels), fraction)
    rows = []
    for mode in modes:
        for batch in batches:
            timm_ms = None
            for variant, (module, fraction) in modules.items():
                result = benchmark(TorchRunner(module, device, mode, dtype), _images(model, batch), dtype, None, SETTINGS, label=variant)
                timm_ms = timm_ms or result["median_ms"]
                rows.append(_row(name, mode, variant, fraction, result, "timm", timm_ms))
    return rows


def time_model_onnx(name: str, batches: list[int], directory: Path) -> list[dict]:
    """Every structure of `name` exported to ONNX (fp32) and timed in onnxruntime on this CPU,
    against the exported ONNX of the dense plan."""
    from vitslim.deploy.runners import OnnxRuntimeRunner
    from vitslim.export.onnx_export import export_plan

    model, structures = _random_model_and_structures(name)
    files = {}
    for variant, (plan, layout, fraction) in structures.items():
        path = directory / f"{name}-{variant.replace(' ', '_').replace('%', '')}.onnx"
        export_plan(model, plan, path, token_layout=layout.tokens, channel_layout=layout.channels)
        files[variant] = (path, fraction)
    rows = []
    for batch in batches:
        dense_ms = None
        for variant, (path, fraction) in files.items():
            with OnnxRuntimeRunner(path) as runner:
                result = benchmark(runner, _images(model, batch), "fp32", None, SETTINGS, label=variant)
            dense_ms = dense_ms or result["median_ms"]
            rows.append(_row(name, "onnxruntime", variant, fraction, result, "dense plan ONNX", dense_ms))
    return rows


def environment(device: str) -> dict:
    import timm

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else host_description()["cpu"]
    return {"device": gpu, "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(), "python": platform.python_version()}


def markdown(rows: list[dict], env: dict, dtype: str) -> str:
    baseline = "the exported dense ONNX" if "onnxruntime" in env else "timm's own model"
    lines = [f"# Latency: vitslim vs {baseline} ({dtype})", "",
             f"{env['device']}, torch {env['torch']}, timm {env['timm']}, CUDA {env['cuda']}, onnxruntime {env.get('onnxruntime', '-')}, {env['date']}. Medians of "
             f"≥ {SETTINGS.min_iterations} iterations over ≥ {SETTINGS.min_seconds} s after {SETTINGS.warmup_seconds} s of warm-up; "
             f"speed-up = {baseline} / variant in the same mode, batch and process; realised / ideal = speed-up / MAC-ideal.", "",
             "| model | mode | batch | variant | MACs | median ms | p90 ms | speed-up vs baseline | MAC-ideal | realised / ideal | setup s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['batch']} | {r['variant']} | {r['macs_fraction']:.1%} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['mac_ideal']:.2f}x | {r['realised_over_ideal']:.2f} | {r['setup_seconds'] or 0:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitslim.latency_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", action="append", help="timm model (repeat); default deit_small_patch16_224")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", action="append", choices=TORCH_MODES, help="repeat; default cuda_graph")
    parser.add_argument("--dtype", default="fp16", choices=tuple(TORCH_DTYPES))
    parser.add_argument("--batch", type=int, action="append", help="repeat; default 1, 64 and 256 (1 and 8 with --onnxruntime)")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="export every structure to ONNX and time it in onnxruntime on this CPU against the dense ONNX (fp32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for name in args.model or ["deit_small_patch16_224"]:
        if args.onnxruntime:
            rows += time_model_onnx(name, args.batch or [1, 8], out)
        else:
            rows += time_model(name, args.device, args.dtype, args.mode or ["cuda_graph"], args.batch or [1, 64, 256])
    env = environment("cpu" if args.onnxruntime else args.device)
    if args.onnxruntime:
        import onnxruntime

        env["onnxruntime"], args.dtype = onnxruntime.__version__, "fp32"
    write_json_atomic(out / "latency.json", {"environment": env, "dtype": args.dtype, "settings": SETTINGS.__dict__, "rows": rows})
    write_text_atomic(out / "latency.md", markdown(rows, env, args.dtype))
    print(markdown(rows, env, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
