"""The recipe summary for people (summary.md) and the list of checks a run failed."""

from __future__ import annotations

from typing import Optional

from vitslim.deploy.bench import speedup_columns
from vitslim.deploy.build import BuildSettings

SUMMARY_BATCH = 8  # the batch of the summary's CPU latency columns


def _number(value: Optional[float], unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def int8_markdown(rows: list[dict]) -> str:
    from .quantization import CALIBRATION_IMAGES

    lines = [
        "",
        f"INT8 (`vitslim quantize`: Q/DQ on the Linear layers, calibrated on {CALIBRATION_IMAGES} training images; details in "
        "VARIANT.int8.report.md): top-1 on the validation split in onnxruntime, agreement and cosine against the fp32 masked reference, "
        f"onnxruntime CPU latency at batch {SUMMARY_BATCH} against the fp32 ONNX in the same run.",
        "",
        "| variant | top-1 fp32 | top-1 fp16 | top-1 int8 | int8 agreement | int8 min "
        "cosine | MB fp32 → int8 | fp32 ms | int8 ms | fp32 time / int8 time (same variant) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "int8_top1" not in r:
            continue
        speedup = r["onnxruntime_ms"] / r["int8_ms"] if r.get("int8_ms") else None  # none without deploy.latency
        lines.append(
            f"| {r['variant']} | {r['onnx_top1']:.2f} | {r['fp16_top1']:.2f} | {r['int8_top1']:.2f} | {r['int8_agreement']:.1%} | {r['int8_cosine']:.4f} | "
            f"{r['onnx_mb']:.2f} → {r['int8_mb']:.2f} | {_number(r.get('onnxruntime_ms'))} | {_number(r.get('int8_ms'))} | {_number(speedup, 'x')} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(title: str, rows: list[dict], settings: BuildSettings = BuildSettings()) -> str:
    timm_ms = rows[0].get("timm_ms")
    latency = (
        f"Latency: median ms per batch of {SUMMARY_BATCH} on this machine's CPU, fp32 eager (p90 in brackets). Speed-up = timm's own "
        f"dense model ({_number(timm_ms)} ms, the model users already run) / the variant's PyTorch compact module, same run; "
        "MAC-ideal = dense MACs / variant MACs; realised / ideal = speed-up / MAC-ideal."
        if timm_ms is not None
        else "Latency: not measured (the recipe's deploy.latency is false). MAC-ideal = dense MACs / variant MACs."
    )
    lines = [
        f"# {title}",
        "",
        latency,
        "",
        "| variant | MMACs | % of dense | params | top-1 PyTorch | top-1 ONNX | max abs diff | ONNX MB "
        "| engine MB | onnxruntime ms | PyTorch ms | speed-up vs timm | MAC-ideal | realised / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = speedup_columns(timm_ms, r["torch_ms"], r["macs_fraction"]) if timm_ms and r.get("torch_ms") else {}
        lines.append(
            f"| {r['variant']} | {r['macs'] / 1e6:.2f} | {100 * r['macs_fraction']:.1f} | {r['params']:,} | "
            f"{_number(r['pytorch_top1'])} | {_number(r['onnx_top1'])} | {r['max_abs_diff']:.1e} | {r['onnx_mb']:.2f} | {_number(r.get('engine_mb'))} | "
            f"{_number(r.get('onnxruntime_ms'))} ({_number(r.get('onnxruntime_p90_ms'))}) | {_number(r.get('torch_ms'))} ({_number(r.get('torch_p90_ms'))}) | "
            f"{_number(ratios.get('speedup'), 'x')} | {1 / r['macs_fraction']:.2f}x | {_number(ratios.get('realised_over_ideal'))} |"
        )
    engines = {r.get("engine_library") for r in rows} - {None}
    if engines:
        precisions = ", ".join(sorted({r["precision"] for r in rows}))
        lines += [
            "",
            f"Engines built ahead of time with {', '.join(sorted(engines))} ({precisions}{', TF32' if settings.tf32 else ''}, "
            f"batch profiles {', '.join(map(str, settings.profiles))}).",
        ]
    text = "\n".join(lines) + "\n"
    text = text + int8_markdown(rows) if any("int8_top1" in r for r in rows) else text
    failed = failed_checks(rows)
    if failed:
        text += "\n**Failed checks** (the run exits 1 unless `--allow-failed-checks`):\n\n" + "".join(
            f"- {f}\n" for f in failed
        )
    return text


def failed_checks(rows: list[dict]) -> list[str]:
    """Every tolerance a variant missed, one line each (fp32 parity is refused at export already)."""
    from vitslim.core.precision import tolerance_for

    failed = []
    for r in rows:
        for precision in ("fp16", "int8"):
            if r.get(f"{precision}_passed") is False:
                rule = tolerance_for(precision).to_dict()
                failed.append(f"{r['variant']}: {precision} outside its tolerance {rule} against the masked reference")
    return failed
