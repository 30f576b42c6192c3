"""python -m benchmarks.latency_accuracy: on digits, a latency-targeted structure against a
MAC-targeted one at the same measured latency (this CPU, onnxruntime, batch 8), over seeds.

After `make run` (it starts from the default run's dense model, runs/digits-vit/dense): a latency
table of the digits model is measured on this CPU; then, per seed, DGSSA + GLAD (the default
recipe's settings: 2 static blocks, `--pyramid auto`) is run with `--target-macs 0.5`, exported and
timed; then run again with the measured latency of that export as its `--target-ms` on the
table, exported and timed. Both are fine-tuned the same way from the same dense model; top-1 is on
the digits validation split, read from the exported ONNX in onnxruntime.

Results: benchmarks/results/latency_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DENSE_RUN = Path("runs/digits-vit/dense")
BATCH = 8
MAC_TARGET = 0.5
GLAD = {"static_blocks": 2, "pyramid": "auto", "finetune_epochs": 24, "distill_weight": 0.5, "label_smoothing": 0.1}


def onnx_top1(path: Path, data) -> float:
    import onnxruntime as ort
    from torch.utils.data import DataLoader

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for images, labels in DataLoader(data.val, batch_size=256):
        logits = session.run(None, {name: images.numpy()})[0]
        correct += int((logits.argmax(-1) == labels.numpy()).sum())
        total += len(labels)
    return 100.0 * correct / total


def onnx_ms(path: Path, shape: tuple[int, ...]) -> float:
    from vitslim.deploy.bench import BenchSettings, benchmark
    from vitslim.deploy.runners import OnnxRuntimeRunner

    images = np.random.default_rng(0).standard_normal((BATCH, *shape)).astype(np.float32)
    with OnnxRuntimeRunner(path) as runner:
        return benchmark(runner, images, settings=BenchSettings(warmup_seconds=0.5, min_seconds=2.0))["median_ms"]


def run(seeds: list[int], progress=print) -> dict:
    from vitslim.pruning.latency import write_latency_table
    from vitslim.pruning.macs import macs_fraction
    from vitslim.pruning.timm_adapter import supported_geometry

    from vitslim.api import export_onnx, load_run, prune
    from vitslim.latency_table import TableSpec, measure_table
    from vitslim.pipeline import data_for

    plan, model = load_run(DENSE_RUN)
    geometry = supported_geometry(model)
    data = data_for(model, "digits")
    shape = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.perf_counter()
        table = measure_table(TableSpec(plan.model, backend="onnxruntime", batch=BATCH), model)
        table_path = write_latency_table(table, work / "table.json")
        progress(f"table in {time.perf_counter() - started:.0f} s; the dense ONNX {table.timm_ms:.3f} ms")
        for seed in seeds:
            measured = {}
            for kind in ("MAC target", "latency target"):
                target = (
                    {"target_macs": MAC_TARGET}
                    if kind == "MAC target"
                    else {"latency_table": str(table_path), "target_ms": measured["MAC target"]["measured_ms"]}
                )
                result = prune(model, data, "dgssa-glad", seed=seed, **GLAD, **target)
                onnx = work / f"{seed}-{kind.split()[0]}.onnx"
                export_onnx(result.model, result.plan, onnx)
                row = {
                    "seed": seed,
                    "kind": kind,
                    "pyramid": result.report["pyramid"],
                    "macs_fraction": macs_fraction(result.plan, geometry),
                    "predicted_ms": table.predict(result.plan, geometry).total_ms,
                    "target_ms": target.get("target_ms"),
                    "measured_ms": onnx_ms(onnx, shape),
                    "top1_onnx": onnx_top1(onnx, data),
                }
                measured[kind] = row
                rows.append(row)
                progress(
                    f"seed {seed} {kind:15s} pyramid {row['pyramid']} MACs {row['macs_fraction']:.1%} "
                    f"predicted {row['predicted_ms']:.3f} measured {row['measured_ms']:.3f} ms top-1 {row['top1_onnx']:.2f} %"
                )
    import onnxruntime
    import torch
    from vitslim.deploy.bench import host_description

    return {
        "environment": {
            "host": host_description(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "batch": BATCH,
            "method_settings": GLAD,
            "mac_target": MAC_TARGET,
        },
        "table": table.to_dict(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_accuracy.json")
    args = parser.parse_args(argv)
    if not (DENSE_RUN / "plan.json").is_file():
        print(f"{DENSE_RUN} is missing: run 'make run' first", file=sys.stderr)
        return 3
    data = run(list(range(args.seeds)), progress=lambda message: print(message, flush=True))
    args.out.write_text(json.dumps(data, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
