"""python -m benchmarks.calibration_profile: how a block's time inside a whole model compares with
its time alone, by tokens read, on this CPU (onnxruntime), against a latency table's calibration.

The latency table times each block alone and calibrates with two whole models (docs/latency.md).
Here whole DeiT-S models (random weights) are exported as the table's runtime runs them and run
under onnxruntime's profiler; each kernel's time is given to the token count of its input
([B, N, C] or [B, H, N, N]), and the time at a count is shared among the blocks that read that many
tokens. Beside it: the table's time alone for such a block, and what the calibration predicts
inside the model: the line through the two calibration models, and the ratio the predictor holds
below the few-tokens model's blocks. Kernels of the patch embedding, the head and aggregations fall
on other counts (196, 224, 384, ...), which are left out.

    python -m benchmarks.calibration_profile [--table benchmarks/results/latency_model_cpu.json]

Results: benchmarks/results/calibration_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vitslim.core.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "deit_small_patch16_224"
STRUCTURES = ("dgssa-glad 1s 1:1/8,4:1/16", "dgssa-glad 2s 2:1/8,6:1/16")  # blocks below the few-tokens ones
RUNS = 20  # profiled runs per model, after 3 warm-up runs


def kernel_ms_by_tokens(path: Path, images: np.ndarray, batch: int) -> tuple[dict[int, float], float]:
    """Mean kernel time per run (ms) by the token count of each kernel's input, and the mean wall time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images}
    for _ in range(3):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(RUNS):
        session.run(None, feed)
    wall_ms = (time.perf_counter() - started) / RUNS * 1000
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    by_tokens: dict[int, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        shapes = [next(iter(shape.values())) for shape in event["args"].get("input_type_shape", [])]
        tokens = next((s[1] for s in shapes if len(s) == 3 and s[0] == batch), None)
        if tokens is None:
            tokens = next((s[2] for s in shapes if len(s) == 4 and s[0] == batch), None)
        if tokens is not None:
            by_tokens[int(tokens)] += event["dur"] / 1000
    return {tokens: ms / runs for tokens, ms in sorted(by_tokens.items())}, wall_ms


def run(table_path: Path) -> dict:
    from vitslim.export.compact import compact_from_plan
    from vitslim.pruning.latency import table_from_dict
    from vitslim.pruning.models import create_model
    from vitslim.pruning.plan import BlockPlan, ModelSpec, TokenCounts, dense_plan, token_counts
    from vitslim.pruning.timm_adapter import supported_geometry

    from benchmarks.operating_points import operating_points
    from benchmarks.timing import environment
    from vitslim.latency_table import export_point, few_tokens_plan

    stored = json.loads(table_path.read_text())["tables"][0]
    table = table_from_dict({key: value for key, value in stored.items() if key != "seconds"}, source=str(table_path))
    spec = ModelSpec(MODEL, {})
    model = create_model(spec).eval()
    geometry = supported_geometry(model)
    base = dense_plan(spec, geometry.depth)
    scale, offset = table.calibration(geometry)
    smallest = table.few_tokens_block_ms(geometry)
    plans = {"dense": base, "few-tokens": few_tokens_plan(spec, geometry)}
    plans.update({p.variant: p.plan for p in operating_points(model, base) if p.variant in STRUCTURES})
    images = np.random.default_rng(0).standard_normal((table.batch, 3, 224, 224)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for index, (name, plan) in enumerate(plans.items()):
            print(f"calibration profile: {index + 1}/{len(plans)} {name}", file=sys.stderr, flush=True)
            path = Path(work) / f"model{index}.onnx"
            export_point(compact_from_plan(model, plan), (3, 224, 224), path, stored["where"]["attention_form"], "fp32")
            by_tokens, wall_ms = kernel_ms_by_tokens(path, images, table.batch)
            readers = collections.defaultdict(list)
            for block, counts in zip(plan.blocks, token_counts(plan, geometry)):
                readers[counts.read].append(block.static_attention is None and counts.written == counts.read)
            for read, whole in sorted(readers.items()):
                if not all(whole):
                    continue  # a static block or one writing fewer reads as many: its kernels are not told apart
                alone = table.timed_alone_ms(BlockPlan(), geometry, TokenCounts(read, read, read))[0]
                inside = by_tokens.get(read, 0.0) / len(whole)
                rows.append(
                    {
                        "model": name,
                        "read": read,
                        "blocks": len(whole),
                        "alone_ms": alone,
                        "inside_ms": inside,
                        "inside_over_alone": inside / alone,
                        "line_over_alone": (scale * alone - offset) / alone,
                        "predicted_over_alone": table.inside_model_ms(alone, geometry) / alone,
                        "wall_ms": wall_ms,
                    }
                )
    return {
        "environment": {
            **environment("cpu"),
            "model": MODEL,
            "batch": table.batch,
            "table": str(table_path),
            "table_measured_on": stored["where"].get("measured_on"),
        },
        "calibration": {"scale": scale, "offset_ms": offset, "few_tokens_block_alone_ms": smallest},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.calibration_profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--table", type=Path, default=RESULTS / "latency_model_cpu.json", help="latency_model results")
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration_profile.json")
    args = parser.parse_args(argv)
    result = run(args.table)
    for row in result["rows"]:
        print(
            f"{row['model']:28s} read {row['read']:3d} ({row['blocks']:2d} blocks): alone {row['alone_ms']:.3f} ms, "
            f"inside {row['inside_ms']:.3f} ms = {row['inside_over_alone']:.2f}x alone; the line "
            f"{row['line_over_alone']:.2f}x, predicted {row['predicted_over_alone']:.2f}x"
        )
    write_json_atomic(args.out, result)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
