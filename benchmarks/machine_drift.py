"""python -m benchmarks.machine_drift: how this machine's speed drifts while a latency table is
measured, and whether the table's quiet gate sees it (onnxruntime, fp32, batch 8, DeiT-S blocks).

For a few minutes, rounds of: the quiet gate's sentinel (the dense block reading the few-tokens
model's count, in one session kept open, run for SENTINEL_TIMING, as `vitslim latency-table` checks it
before each timing), then the dense block reading each of READS tokens timed as a table's point is
(a new session, TABLE_TIMING). Each block's slow spells show as rounds far above its quietest
rounds; whether they are a factor or an added time shows in how they move together; whether the
sentinel sees them shows in its median beside them.

    python -m benchmarks.machine_drift [--seconds 300]

Results: benchmarks/results/machine_drift.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "deit_small_patch16_224"
READS = (25, 50, 99, 197)


def run(seconds: float, progress=print) -> dict:
    import onnxruntime
    from vitslim.deploy.bench import host_description
    from vitslim.pruning.models import create_model
    from vitslim.pruning.plan import ModelSpec
    from vitslim.pruning.timm_adapter import supported_geometry

    from vitslim.latency_table import (
        QUIET_SLACK,
        TABLE_TIMING,
        ModuleTimer,
        QuietGate,
        TableSpec,
        block_parts,
        blocks_of,
        sentinel_point,
    )

    spec_model = ModelSpec(MODEL, {})
    model = create_model(spec_model).eval()
    geometry = supported_geometry(model)
    spec = TableSpec(spec_model)
    parts = block_parts(blocks_of(model)[0])
    full = {"static": False, "kept": 1.0, "attention_width": 1.0, "mlp_width": 1.0}
    sentinel = sentinel_point(geometry)
    sentinel_read = sentinel["read"]
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        timer = ModuleTimer(spec, TABLE_TIMING, Path(work))
        blocks = {read: timer.block(parts, geometry, read=read, **full) for read in READS}
        shape = (sentinel_read, geometry.dim)
        with timer.runner(timer.block(parts, geometry, **sentinel), shape) as runner:
            gate = QuietGate(runner, timer.inputs(shape), max_wait_seconds=0.0)
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                row = {"seconds": round(time.perf_counter() - started, 1), "sentinel_ms": gate.sentinel_ms()}
                row.update(
                    {str(read): timer.ms(module, (read, geometry.dim), key=read) for read, module in blocks.items()}
                )
                rounds.append(row)
                progress(" ".join(f"{key} {value:.4g}" for key, value in row.items()))
    return {
        "environment": {
            "host": host_description(),
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "model": MODEL,
            "batch": spec.batch,
            "sentinel_read": sentinel_read,
            "quiet_slack": QUIET_SLACK,
        },
        "summary": summary(rounds),
        "rounds": rounds,
    }


def summary(rounds: list[dict]) -> dict:
    """Per block: quietest, median and slowest time, its median over the rounds the sentinel
    called quiet and over those it called slow (as the gate judges: QUIET_SLACK over the
    QUIET_PERCENTILE-th percentile; here of every round, the gate's of the checks so far), and in
    how many rounds the block, judged the same way against its own times, agreed."""
    import numpy as np

    from vitslim.latency_table import QUIET_PERCENTILE, QUIET_SLACK

    def slow_spell(times: list[float]) -> list[bool]:
        quiet = np.percentile(times, QUIET_PERCENTILE)
        return [bool(ms > (1 + QUIET_SLACK) * quiet) for ms in times]

    slow = slow_spell([row["sentinel_ms"] for row in rounds])
    result = {"rounds": len(rounds), "sentinel_slow_rounds": sum(slow)}
    for read in READS:
        times = [row[str(read)] for row in rounds]
        when_quiet = [t for t, is_slow in zip(times, slow) if not is_slow]
        when_slow = [t for t, is_slow in zip(times, slow) if is_slow]
        result[str(read)] = {
            "rounds_agreeing_with_sentinel": sum(a == b for a, b in zip(slow_spell(times), slow)),
            "quietest_ms": min(times),
            "median_ms": statistics.median(times),
            "slowest_ms": max(times),
            "median_when_sentinel_quiet_ms": statistics.median(when_quiet) if when_quiet else None,
            "median_when_sentinel_slow_ms": statistics.median(when_slow) if when_slow else None,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machine_drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to sample")
    parser.add_argument("--out", type=Path, default=RESULTS / "machine_drift.json")
    args = parser.parse_args(argv)
    from vitslim.core.files import write_json_atomic

    result = run(args.seconds, progress=lambda message: print(message, flush=True))
    for read, block in result["summary"].items():
        print(f"{read}: {block}")
    write_json_atomic(args.out, result)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
