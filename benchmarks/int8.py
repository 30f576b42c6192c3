"""INT8 on the digits models of several seeds of the default recipe: for every variant and seed,
`vitslim quantize` (Q/DQ on the Linear layers, 256 calibration images) against its fp32 ONNX and
masked PyTorch reference, plus onnxruntime CPU latency of int8 against fp32 at batch 1 and 8,
timed interleaved in one process on this machine (paired A/B, as `gate --ab` does) on the first
run's models.

    python -m benchmarks.int8 --runs runs/seeds/s0/digits-vit runs/seeds/s1/digits-vit ...

Writes benchmarks/results/int8.json and int8.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from vitslim.deploy.bench import host_description
from vitslim.deploy.gate import ABSettings, paired_ab
from vitslim.deploy.runners import OnnxRuntimeRunner
from vitslim.pruning.run_dir import load_run

from vitslim.core.files import write_json_atomic, write_text_atomic
from vitslim.pipeline import data_for
from vitslim.quantization import quantize_and_measure, reference_logits

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("dense", "vtp", "patch-slim", "dgssa-glad")


def latency_ratio(fp32: Path, int8: Path, batch: int) -> dict:
    """int8 / fp32 latency by the paired gate's estimator (one onnxruntime thread each)."""
    images = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(fp32, threads=1) as a, OnnxRuntimeRunner(int8, threads=1) as b:
        result = paired_ab(a, b, images, ABSettings(fail=0.5, max_seconds=20))
    return {
        "batch": batch,
        "ratio": result.ratio,
        "interval": result.interval,
        "fp32_ms": result.baseline_median_ms,
        "int8_ms": result.candidate_median_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="run roots of the default recipe (each with dense/, vtp/, ... and VARIANT.onnx)",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for root in map(Path, args.runs):
            for variant in VARIANTS:
                plan, model = load_run(root / variant)
                data = data_for(model, "digits")
                out = Path(work) / f"{root.parent.name}-{variant}.int8.onnx"
                report = quantize_and_measure(
                    root / f"{variant}.onnx", data, out, reference_logits(model, plan, data.val)
                )
                fp32, int8 = report["rows"][0], report["rows"][-1]
                timed = root == Path(
                    args.runs[0]
                )  # latency on the first run's models only (the models differ by seed, not by size)
                rows.append(
                    {
                        "run": str(root),
                        "variant": variant,
                        "fp32_top1": fp32["top1"],
                        "int8_top1": int8["top1"],
                        "agreement": int8["agreement"],
                        "cosine": int8["cosine"],
                        "fp32_mb": fp32["mb"],
                        "int8_mb": int8["mb"],
                        "latency": [latency_ratio(root / f"{variant}.onnx", out, batch) for batch in (1, 8)]
                        if timed
                        else None,
                    }
                )
                print(
                    f"{root} {variant}: fp32 {fp32['top1']:.2f} int8 {int8['top1']:.2f} agreement {int8['agreement']:.1%}",
                    flush=True,
                )
    data = {"host": host_description(), "rows": rows}
    write_json_atomic(RESULTS / "int8.json", data)
    write_text_atomic(RESULTS / "int8.md", markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    host = data["host"]
    lines = [
        "# INT8 on the digits models",
        "",
        f"{host['cpu']} ({host['cores']} cores); onnxruntime CPU, one thread; latency ratio int8 / fp32 by the paired gate's estimator "
        "(median of per-round pair ratios). Top-1 on the 359 validation images; agreement with the fp32 masked PyTorch reference.",
        "",
        "| variant | seeds | fp32 top-1 (mean) | int8 top-1 (mean) | int8 − fp32 "
        "(mean, range) | agreement (min) | MB fp32 → int8 | latency int8/fp32 b1 | b8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rows = [r for r in data["rows"] if r["variant"] == variant]
        if not rows:
            continue
        deltas = [r["int8_top1"] - r["fp32_top1"] for r in rows]
        ratio = {b: next(r["latency"][i]["ratio"] for r in rows if r["latency"]) for i, b in enumerate((1, 8))}
        lines.append(
            f"| {variant} | {len(rows)} | {statistics.mean(r['fp32_top1'] for r in rows):.2f} | {statistics.mean(r['int8_top1'] for r in rows):.2f} | "
            f"{statistics.mean(deltas):+.2f} ({min(deltas):+.2f} to {max(deltas):+.2f}) | {min(r['agreement'] for r in rows):.1%} | "
            f"{statistics.mean(r['fp32_mb'] for r in rows):.2f} → {statistics.mean(r['int8_mb'] for r in rows):.2f} | {ratio[1]:.2f} | {ratio[8]:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
