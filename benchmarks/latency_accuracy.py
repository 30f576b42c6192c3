"""python -m benchmarks.latency_accuracy: on digits, a latency-targeted structure against a
MAC-targeted one that measures as fast (this CPU, onnxruntime, batch 8), over seeds.

After `make run` (it starts from the default run's dense model, runs/digits-vit/dense): a latency
table of the digits model is measured on this CPU, and the target is 2x timm's model. Both arms
run DGSSA + GLAD searching its static blocks (0 to 3) together with the pyramid
(`--max-static-blocks 3 --pyramid auto`), with the same candidates and the same proxy; they differ
only in what the target is counted in:

- latency-targeted: `--target-speedup 2` on the table (what vitslim offers);
- MAC-targeted: what a user steering by MACs would have to do, by trial on the clock: the largest
  `--target-macs` on a grid (0.70 down to 0.30, step 0.02) whose structure, exported, measures at
  least the target speed-up (the grid's structures are built without fine-tuning, which changes no
  shape).

So both aim at the same target, one on the table's prediction, the other on the clock. Both are
fine-tuned the same way from the same dense model, exported and timed; the latency-targeted one
must then measure within 5 % of its target. Top-1 is on the digits validation split, read from
the exported ONNX in onnxruntime. Every time is taken in
five rounds beside timm's own model (exported the way the table's baseline is) and compared as a
speed-up over it: this VM's speed drifts by up to 50 % over minutes; and each timing waits for a
quiet spell, as a latency table's do (a slow spell adds as much time as these models take).

Results: benchmarks/results/latency_accuracy.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DENSE_RUN = Path("runs/digits-vit/dense")
BATCH = 8
SPEEDUP = 2.0  # the target: timm's model on the table over this
MAC_GRID = [round(0.70 - 0.02 * step, 2) for step in range(21)]  # 0.70 down to 0.30: the MAC arm's trials
TIMING_ROUNDS = 5  # ORT sessions on this 2-vCPU VM are bimodal (one or two busy threads): the median of five
TOLERANCE = 0.05  # the latency-targeted structure, measured, may fall this much short (the "within 5 %")
GLAD = {
    "max_static_blocks": 3,
    "pyramid": "auto",
    "finetune_epochs": 24,
    "distill_weight": 0.5,
    "label_smoothing": 0.1,
}


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


def timm_onnx(model, shape: tuple[int, ...], path: Path) -> Path:
    """timm's own model exported as a latency table's onnxruntime baseline is (vitslim's exporter, the default attention form)."""
    import onnx
    import torch
    from vitslim.export.attention_form import DEFAULT_ATTENTION_FORM, attention_form
    from vitslim.export.onnx_export import onnx_graph

    with torch.no_grad():
        graph = onnx_graph(
            copy.deepcopy(model).eval(), torch.randn(2, *shape), path, attention_form(DEFAULT_ATTENTION_FORM)
        )
    onnx.save(graph, str(path))
    return path


def timed_against_timm(paths: list[Path], timm: Path, images: np.ndarray, gate) -> list[dict]:
    """Each ONNX's median ms and speed-up over timm's model, timed in TIMING_ROUNDS rounds that
    time timm's model and then each ONNX (medians over the rounds). This VM's speed drifts by up
    to 50 % over minutes, so a time is only compared with timm's model timed beside it; and a slow
    spell adds 1-2 ms to every run (benchmarks/results/machine_drift.json), as much as these
    models take, so every timing first waits for a quiet spell at `gate` (a latency table's
    QuietGate)."""
    from vitslim.deploy.bench import BenchSettings, benchmark
    from vitslim.deploy.runners import OnnxRuntimeRunner

    settings = BenchSettings(warmup_seconds=0.5, min_seconds=1.0)

    def timed(path: Path) -> float:
        gate.wait()
        with OnnxRuntimeRunner(path) as runner:
            return benchmark(runner, images, settings=settings)["median_ms"]

    rounds: list[list[float]] = [[] for _ in paths]
    speedups: list[list[float]] = [[] for _ in paths]
    for _ in range(TIMING_ROUNDS):
        timm_ms = timed(timm)
        for times, ratios, path in zip(rounds, speedups, paths):
            times.append(timed(path))
            ratios.append(timm_ms / times[-1])
    return [
        {"measured_ms": float(np.median(times)), "measured_speedup": float(np.median(ratios))}
        for times, ratios in zip(rounds, speedups)
    ]


def run(seeds: list[int], progress=print) -> dict:
    from vitslim.deploy.runners import OnnxRuntimeRunner
    from vitslim.pruning.latency import write_latency_table
    from vitslim.pruning.macs import macs_fraction
    from vitslim.pruning.timm_adapter import supported_geometry

    from vitslim.api import export_onnx, load_run, prune
    from vitslim.latency_table import QuietGate, TableSpec, measure_table
    from vitslim.pipeline import data_for

    plan, model = load_run(DENSE_RUN)
    geometry = supported_geometry(model)
    data = data_for(model, "digits")
    shape = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    rows, trials = [], []
    images = np.random.default_rng(0).standard_normal((BATCH, *shape)).astype(np.float32)
    # the MAC trials' quiet gate waits as long as the table's (spec.quiet_wait_seconds)
    spec = TableSpec(plan.model, backend="onnxruntime", batch=BATCH)
    with tempfile.TemporaryDirectory() as work, ExitStack() as stack:
        work = Path(work)
        started = time.perf_counter()
        table = measure_table(spec, model, progress=progress)
        table_path = write_latency_table(table, work / "table.json")
        progress(f"table in {time.perf_counter() - started:.0f} s; timm's model {table.timm_ms:.3f} ms on it")
        timm = timm_onnx(model, shape, work / "timm.onnx")
        # the quiet gate's sentinel: timm's model, in one session kept open for the whole run
        gate = QuietGate(stack.enter_context(OnnxRuntimeRunner(timm)), images, spec.quiet_wait_seconds)

        def structure(result) -> tuple:
            return result.report["static_blocks"], result.report["pyramid"]

        for seed in seeds:
            # The MAC arm's trials: every grid fraction's structure (no fine-tuning: it changes no
            # shape), each distinct one exported and timed, all in the same rounds.
            trial_of, exports = {}, {}
            for fraction in MAC_GRID:
                result = prune(
                    model, data, "dgssa-glad", seed=seed, **{**GLAD, "finetune_epochs": 0}, target_macs=fraction
                )
                key = json.dumps(structure(result))
                trial_of[fraction] = key
                if key not in exports:
                    exports[key] = work / f"{seed}-trial-{len(exports)}.onnx"
                    export_onnx(result.model, result.plan, exports[key])
            timed = dict(zip(exports, timed_against_timm(list(exports.values()), timm, images, gate)))
            for fraction, key in trial_of.items():
                trials.append({"seed": seed, "target_macs": fraction, "structure": key, **timed[key]})
            # the same criterion as the latency search's (the target itself, no tolerance), on the clock
            fitting = [f for f in MAC_GRID if timed[trial_of[f]]["measured_speedup"] >= SPEEDUP]
            if not fitting or fitting[0] == MAC_GRID[0]:
                raise SystemExit(
                    f"seed {seed}: the MAC arm's answer is not inside the grid {MAC_GRID[-1]}..{MAC_GRID[0]} "
                    f"({'none' if not fitting else 'its largest fraction'} meets {SPEEDUP}x): widen MAC_GRID"
                )
            progress(
                f"seed {seed} MAC trials: "
                + ", ".join(f"{key} {t['measured_speedup']:.2f}x" for key, t in timed.items())
                + f"; the largest fraction within the target: {fitting[0]:.2f}"
            )
            arms = []
            for kind, target in (
                ("MAC target", {"target_macs": fitting[0]}),
                ("latency target", {"latency_table": str(table_path), "target_speedup": SPEEDUP}),
            ):
                result = prune(model, data, "dgssa-glad", seed=seed, **GLAD, **target)
                if kind == "MAC target":  # fine-tuning changes no shape: the structure the trial timed
                    assert json.dumps(structure(result)) == trial_of[fitting[0]]
                onnx = work / f"{seed}-{kind.split()[0]}.onnx"
                export_onnx(result.model, result.plan, onnx)
                arms.append((kind, target, result, onnx))
            measured = timed_against_timm([onnx for *_, onnx in arms], timm, images, gate)
            for (kind, target, result, onnx), timing in zip(arms, measured):
                static, pyramid = structure(result)
                row = {
                    "seed": seed,
                    "kind": kind,
                    "target_macs": target.get("target_macs"),
                    "static_blocks": static,
                    "pyramid": pyramid,
                    "divergence": next(r["divergence"] for r in result.report["structure_search"] if r["chosen"]),
                    "macs_fraction": macs_fraction(result.plan, geometry),
                    "predicted_ms": table.predict(result.plan, geometry).total_ms,
                    "predicted_speedup": table.timm_ms / table.predict(result.plan, geometry).total_ms,
                    **timing,
                    "top1_onnx": onnx_top1(onnx, data),
                }
                rows.append(row)
                progress(
                    f"seed {seed} {kind:15s} static {static} pyramid {pyramid} MACs {row['macs_fraction']:.1%} "
                    f"predicted {row['predicted_speedup']:.2f}x measured {row['measured_speedup']:.2f}x "
                    f"({row['measured_ms']:.3f} ms) top-1 {row['top1_onnx']:.2f} %"
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
            "target_speedup": SPEEDUP,
            "tolerance": TOLERANCE,
            "timing_rounds": TIMING_ROUNDS,
            "quiet_wait_seconds": spec.quiet_wait_seconds,
            "mac_grid": MAC_GRID,
        },
        "table": table.to_dict(),
        "rows": rows,
        "mac_trials": trials,
        "quiet_gate": gate.to_dict(),
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
