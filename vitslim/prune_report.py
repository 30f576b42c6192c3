"""What a pruned run directory shows people: prune_report.md and the method's own plot.

Each method's plot is declared once, in METHOD_PLOTS (a method without one gets the report alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from vitslim.core.files import write_text_atomic
from vitslim.pruning.data import DataSplits, calibration_set
from vitslim.pruning.plan import SlimPlan
from vitslim.pruning.timm_adapter import ViTGeometry, geometry_of, patch_grid

from .plots import attention_analysis_png, kept_dims_png, kept_patches_png


def model_title(name: str, geometry: ViTGeometry) -> str:
    """A model as plot titles name it: timm's name and the geometry it was built with (a custom
    4-block model is not the 12-block model its timm name suggests)."""
    return (
        f"{name} (depth {geometry.depth}, width {geometry.dim}, {geometry.num_heads} heads, "
        f"{geometry.num_patches} patches)"
    )


def prune_report_markdown(report: dict) -> str:
    lines = [
        f"# Prune report: {report['model']['name']} with {report.get('plan_method', report['method'])}",
        "",
        f"- Params: {report['params_dense']:,} → {report['params']:,} ({report['params'] / report['params_dense']:.1%})",
        f"- MACs: {report['macs_dense']:,} → {report['macs']:,} ({report['macs'] / report['macs_dense']:.1%})",
    ]
    start = report.get("start")
    if start:
        lines.append(
            f"- Started from a {start['method']} run: {start['macs']:,} MACs ({start['macs'] / report['macs_dense']:.1%}), "
            f"{start['params']:,} params; {report['method']} cut it to {report['macs'] / start['macs']:.1%} of its MACs"
        )
    latency = report.get("latency")
    if latency:
        target = "" if latency["target_ms"] is None else f" (target {latency['target_ms']:.4g} ms)"
        lines.append(
            f"- Latency predicted on {latency['where']}: {latency['predicted_ms']:.4g} ms{target}, "
            f"{latency['predicted_speedup']:.2f}× timm's model ({latency['timm_ms']:.4g} ms); table {latency['table']}"
        )
    lines += [f"- {key.replace('_', ' ')}: {value:.2f} %" for key, value in report.items() if key.startswith("top1_")]
    if "pruned_fraction" in report:
        lines.append(f"- Gated dims pruned: {report['pruned_fraction']:.1%}")
    if "round_to" in report:  # VTP's: with a latency target its search chose the ratio and rounding
        lines.append(
            f"- Prune ratio {report['prune_ratio']:.3f}, kept counts rounded to multiples of {report['round_to']}; "
            f"gate magnitude kept: {report['kept_gate_magnitude']:.4g}"
        )
    lines += ["", "## Settings", "", "```", json.dumps(report["config"], indent=1), "```"]
    if report.get("kept_dims"):
        spaces = [k for k in report["kept_dims"][0] if k != "block"]
        lines += [
            "",
            "## Kept dims per block",
            "",
            "| block | " + " | ".join(spaces) + " |",
            "|---" * (len(spaces) + 1) + "|",
        ]
        lines += [
            f"| {row['block']} | " + " | ".join(str(row[s]) for s in spaces) + " |" for row in report["kept_dims"]
        ]
    if report.get("analysis"):
        lines += [
            "",
            f"## Attention analysis (static blocks: {report['static_blocks']}, pyramid: {report['pyramid']})",
            "",
            "| block | cosine to mean map | KL to mean map | effective rank | top singular energy |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {a['block']} | {a['cosine']:.3f} | {a['kl']:.3f} | {a['effective_rank']:.2f} | {a['top_energy']:.3f} |"
            for a in report["analysis"]
        ]
    if report.get("structure_search"):
        lines += [
            "",
            "## Structures that meet the target (--max-static-blocks: the least divergence is kept)",
            "",
            "| static blocks | pyramid | MACs | predicted ms | divergence from the start model | kept |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["structure_search"]:
            predicted = f"{row['predicted_ms']:.4g}" if "predicted_ms" in row else "–"  # a MAC target, no table
            lines.append(
                f"| {row['static_blocks']} | {row['pyramid']} | {row['macs_fraction']:.1%} | {predicted} | "
                f"{row['divergence']:.4g} | {'yes' if row['chosen'] else ''} |"
            )
    if report.get("kept_tokens"):
        lines += ["", "## Tokens output per block", "", "| block | tokens |", "|---|---|"]
        lines += [f"| {block} | {count} |" for block, count in enumerate(report["kept_tokens"])]
    return "\n".join(lines) + "\n"


def _vtp_plot(report: dict, plan: SlimPlan, model: nn.Module, data: DataSplits, out: Path) -> None:
    geometry = geometry_of(model)
    kept_dims_png(
        report["kept_dims"],
        geometry.channel_sizes,
        out / "kept_dims.png",
        f"VTP: kept dims per block\n{model_title(plan.model.name, geometry)}",
    )


def _dgssa_glad_plot(report: dict, plan: SlimPlan, model: nn.Module, data: DataSplits, out: Path) -> None:
    attention_analysis_png(
        report["analysis"],
        report["static_blocks"],
        out / "attention_analysis.png",
        f"DGSSA/GLAD attention analysis on {data.source}\n{model_title(plan.model.name, geometry_of(model))}",
    )


def _patch_slimming_plot(report: dict, plan: SlimPlan, model: nn.Module, data: DataSplits, out: Path) -> None:
    geometry = geometry_of(model)
    kept_patches_png(
        calibration_set(data.val, 4).images,
        report["token_sets"],
        geometry.num_prefix_tokens,
        patch_grid(model),
        out / "kept_patches.png",
        f"Patch Slimming: kept patches per block\n{model_title(plan.model.name, geometry)}",
    )


# method name (pruning.methods' registry) -> its plot
METHOD_PLOTS: dict[str, Callable[[dict, SlimPlan, nn.Module, DataSplits, Path], None]] = {
    "vtp": _vtp_plot,
    "dgssa-glad": _dgssa_glad_plot,
    "patch-slim": _patch_slimming_plot,
}


def write_prune_report(report: dict, plan: SlimPlan, model: nn.Module, data: DataSplits, out: Path) -> None:
    """prune_report.md and the method's plot (if it has one) into the run directory `out`."""
    write_text_atomic(out / "prune_report.md", prune_report_markdown(report))
    plot = METHOD_PLOTS.get(report["method"])
    if plot is not None:
        plot(report, plan, model, data, out)
