"""python -m benchmarks.latency_model gpu|onnx_gpu|cpu: how well a latency table predicts
the latency of whole models, and whether latency-targeted structures meet their targets.

On DeiT-S with random weights (latency does not depend on them): a table is measured with
`vitslim.latency_table.measure_table` at each batch; then every operating point of BENCHMARKS.md
(dense, Patch Slimming, VTP 20/40 %, the DGSSA + GLAD structures) is timed whole, the same way,
beside the table's prediction (each timing waits for a quiet spell, held to the quiet level the
table's gate learned: `whole_models_quiet_gate` in each table's entry); then each method's
structure search is run against the table for a
target speed-up and the structure it finds is timed, and so is Patch Slimming's token search from
a VTP start (methods compose; the prediction is of the whole plan). The searches run on synthetic scores (the
benchmarks' token ranking, gate magnitudes and effective ranks, as no training happens here), so
what is checked is the table and the searches' honouring of the target, not accuracy.

Results: benchmarks/results/latency_model_{gpu,onnx_gpu,cpu}.json; on a machine whose calls are
limited in time, one `--batch` per call to latency_model_WHERE_B.json, which replaces that batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from vitslim.deploy.bench import BenchSettings

from vitslim.core.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "deit_small_patch16_224"
# speed-ups over timm's model (on the table's runtime) that each method's search is asked for;
# vtp+patch-slim: the token search from a VTP start of COMPOSED_VTP_RATIO (methods compose)
TARGET_SPEEDUPS = {"patch-slim": 1.4, "vtp": 1.25, "dgssa-glad": 2.0, "vtp+patch-slim": 1.6}
COMPOSED_VTP_RATIO = 0.2
# whole models are timed a little longer than the table's single blocks, each in this many
# sessions (the median, as the table's calibration models: sessions on a 2-vCPU VM differ by 20 %)
WHOLE_MODEL_TIMING = BenchSettings(warmup_seconds=0.3, min_seconds=0.6, min_iterations=10, max_rounds=2)
WHOLE_MODEL_SESSIONS = 3
# the ONNX runtimes' points exported in this many processes (half the cores this process may use)
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
EXPORT_WORKERS = max(1, min(8, USABLE_CORES // 2))
WHERE = {  # name -> (backend, device, precision, torch mode, batches)
    "gpu": ("torch", "cuda", "fp16", "cuda_graph", (64, 256)),
    "onnx_gpu": ("onnxruntime", "cuda", "fp16", "eager", (64, 256)),
    "cpu": ("onnxruntime", "cpu", "fp32", "eager", (8,)),
}


def synthetic_ranks(depth: int, patches: int) -> list[dict]:
    """Effective ranks falling with depth, as the attention analysis of a trained DeiT finds them."""
    return [{"effective_rank": patches * 0.5 ** (block / 3)} for block in range(depth)]


class TimedPlan(NamedTuple):
    """A structure the benchmark times: an operating point (no target) or a search's result."""

    plan: object  # a SlimPlan
    target_ms: Optional[float]
    round_to: Optional[int] = None  # VTP's: the rounding its search chose


def targeted_plans(model, base, table, geometry) -> dict[str, TimedPlan]:
    """Each method's structure search against `table` for its TARGET_SPEEDUPS entry."""
    from vitslim.pruning.latency import LatencyBudget
    from vitslim.pruning.methods.dgssa_glad import auto_pyramid, structure_plan
    from vitslim.pruning.methods.vtp import VTPConfig, plan_from_gates, structure_for_target
    from vitslim.pruning.timm_adapter import patch_grid

    from benchmarks.operating_points import hidden_heavy_gates, pyramid_counts, token_pyramid_plan

    def token_pyramid(budget, start):  # the token pyramid's rho: the most tokens that fit
        low, high = 0.0, 1.0
        for _ in range(30):
            rho = (low + high) / 2
            plan = token_pyramid_plan(geometry, start, pyramid_counts(geometry, rho))
            low, high = (rho, high) if budget.fits(plan) else (low, rho)
        return token_pyramid_plan(geometry, start, pyramid_counts(geometry, low))

    gates, config = hidden_heavy_gates(geometry), VTPConfig(round_to=8)
    plans = {}
    for method, speedup in TARGET_SPEEDUPS.items():
        round_to = None
        budget = LatencyBudget(table, geometry, table.timm_ms / speedup)
        if method == "patch-slim":
            plan = token_pyramid(budget, base)
        elif method == "vtp+patch-slim":
            plan = token_pyramid(budget, plan_from_gates(gates, geometry, base, config, COMPOSED_VTP_RATIO))
        elif method == "vtp":
            chosen = structure_for_target(gates, geometry, base, config, budget)
            plan, round_to = chosen.plan, chosen.round_to
        else:
            grid = patch_grid(model)
            stages = auto_pyramid(
                synthetic_ranks(geometry.depth, geometry.num_patches),
                0,
                geometry,
                grid,
                lambda candidate, budget=budget, grid=grid: budget.fits(
                    structure_plan(base, 0, candidate, geometry, grid)
                ),
                f"{budget.target_ms} ms",
            )
            plan = structure_plan(base, 0, stages, geometry, grid)
        plans[method] = TimedPlan(plan, budget.target_ms, round_to)
    return plans


def run(where: str, model_kwargs: dict, batches=None, progress=print) -> dict:
    from vitslim.export.compact import compact_from_plan
    from vitslim.pruning.macs import macs_fraction
    from vitslim.pruning.models import create_model
    from vitslim.pruning.plan import ModelSpec, dense_plan
    from vitslim.pruning.timm_adapter import block_parts, blocks_of, supported_geometry

    from benchmarks.operating_points import operating_points
    from vitslim.latency_table import ModuleTimer, TableSpec, measure_table, quiet_gate

    backend, device, precision, mode, default_batches = WHERE[where]
    batches = batches or default_batches
    spec_model = ModelSpec(MODEL, model_kwargs)
    model = create_model(spec_model).eval()
    geometry = supported_geometry(model)
    base = dense_plan(spec_model, geometry.depth)
    image = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    rows, tables = [], []
    import tempfile

    for batch in batches:
        spec = TableSpec(
            spec_model,
            backend=backend,
            device=device,
            precision=precision,
            batch=batch,
            torch_mode=mode,
            export_workers=EXPORT_WORKERS,
        )
        started = time.perf_counter()
        label = f"{where} batch {batch}"
        table = measure_table(spec, model, progress=lambda message, label=label: progress(f"{label}: {message}"))
        table_seconds = time.perf_counter() - started
        progress(f"{where} batch {batch}: table in {table_seconds:.0f} s, timm {table.timm_ms:.3f} ms")
        tables.append({**table.to_dict(), "seconds": table_seconds})
        with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
            timer = ModuleTimer(spec, WHOLE_MODEL_TIMING, Path(work))
            # the whole models wait for quiet spells as the table's timings did: a table measured in
            # quiet spells predicts them, and a machine in a slow one for minutes adds 1-2 ms a block
            # (held to the table's quiet level: a gate learning its own from a slow start holds nothing)
            known = (table.where.get("quiet_gate") or {}).get("sentinel_quiet_ms")
            gate = quiet_gate(timer, block_parts(blocks_of(model)[0]), geometry, stack, known)
            points = [
                (p.variant, "operating point", TimedPlan(p.plan, None))
                for p in operating_points(model, base)
                if p.plan is not None
            ]
            points += [
                (f"{method} for {TARGET_SPEEDUPS[method]}x", "latency target", targeted)
                for method, targeted in targeted_plans(model, base, table, geometry).items()
            ]
            modules = {
                variant: (compact_from_plan(model, point.plan, pad_value_heads=timer.pads_value_heads), image)
                for variant, _, point in points
            }
            progress(f"{where} batch {batch}: exporting and timing {len(modules)} whole models")
            timer.export_all((variant, *module) for variant, module in modules.items())  # once, for every pass

            # in passes over all of them (a slow minute of the machine spread over every model)
            passes = []
            for _ in range(WHOLE_MODEL_SESSIONS):
                passes.append([])
                for variant, *_ in points:
                    gate.wait()
                    passes[-1].append(timer.ms(*modules[variant], key=variant))
            tables[-1]["whole_models_quiet_gate"] = gate.to_dict()
            for (variant, kind, (plan, target, round_to)), *timed in zip(points, *passes):
                measured = float(statistics.median(timed))
                predicted = table.predict(plan, geometry).total_ms
                row = {
                    "where": where,
                    "batch": batch,
                    "variant": variant,
                    "kind": kind,
                    "macs_fraction": macs_fraction(plan, geometry),
                    "predicted_ms": predicted,
                    "measured_ms": measured,
                    "prediction_error": measured / predicted - 1,
                    "timm_ms": table.timm_ms,
                    "speedup": table.timm_ms / measured,
                    "target_ms": target,
                    "target_error": None if target is None else measured / target - 1,
                    **({} if round_to is None else {"round_to": round_to}),
                }
                rows.append(row)
                progress(
                    f"  {variant:32s} predicted {predicted:8.3f} measured {measured:8.3f} ms ({row['prediction_error']:+.1%})"
                    + ("" if target is None else f" target {target:.3f} ({row['target_error']:+.1%})")
                )
    return results(where, precision, tables, rows)


def results(where: str, precision: str, tables: list[dict], rows: list[dict]) -> dict:
    from vitslim.deploy.bench import host_description

    host = host_description()
    import onnxruntime
    import timm

    return {
        "environment": {
            "where": where,
            "host": host,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "model": MODEL,
            "runtime": tables[0]["where"]["runtime"],
            "precision": precision,
        },
        "target_speedups": TARGET_SPEEDUPS,
        "composed_vtp_ratio": COMPOSED_VTP_RATIO,
        "tables": tables,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("where", choices=tuple(WHERE))
    parser.add_argument("--out", type=Path, help="default benchmarks/results/latency_model_WHERE.json")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeat); default the WHERE's own")
    parser.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="timm kwargs of DeiT-S (a smaller model to try the script)",
    )
    args = parser.parse_args(argv)
    from vitslim.pruning.models import parse_model_kwargs

    data = run(
        args.where,
        parse_model_kwargs(args.model_kwargs),
        args.batch,
        progress=lambda message: print(message, flush=True),
    )
    out = args.out or RESULTS / f"latency_model_{args.where}.json"
    write_json_atomic(out, data)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
