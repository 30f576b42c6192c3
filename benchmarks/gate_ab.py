"""How the paired A/B gate (`vitslim gate --ab`) behaves on a loaded shared machine.

With `--busy N` background processes spinning on the CPU (default 2: both cores of the 2-core CI
VM), run the gate `--runs` times each on: the digits ONNX against itself (A/A: must pass), against
a candidate made 15 % slower (must be flagged) and 5 % slower (must not be called a failure at the
default 10 % threshold). The slowdown is injected by `SlowedRunner`, which keeps the CPU busy for
a fraction of each inference's own time after it, so it follows the load. It spins rather than
sleeps: on a loaded machine a sleep does not last what it asks for (at batch 1 a "5 % sleep"
measured 1.3-2.2x slower; at batch 16 a "15 % sleep" measured 11-12 % and a sleep of 0 made the
candidate 5 % faster, the scheduler favouring the process that woke up). `--slowdown sleep` runs
the sleeping variant (results in gate_ab_sleep.*).

    python -m benchmarks.gate_ab --onnx runs/digits-vit/dense.onnx   # after 'make run'

Writes benchmarks/results/gate_ab.json and gate_ab.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from vitslim.deploy.bench import host_description
from vitslim.deploy.gate import PASS, REGRESSION, UNDECIDED, ABSettings
from vitslim.deploy.runners import OnnxRuntimeRunner, Runner

from vitslim.core.files import write_json_atomic, write_text_atomic
from vitslim.measure import run_ab

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("A/A", 0.0, PASS), ("15 % slower", 0.15, REGRESSION), ("5 % slower", 0.05, PASS))
VERDICTS = {PASS: "pass", REGRESSION: "regression", UNDECIDED: "undecided"}


class SlowedRunner(Runner):
    """Injects a slowdown: after each inference, spins (or with `sleep`, sleeps) for `fraction`
    of the time it took."""

    def __init__(self, inner: Runner, fraction: float, sleep: bool = False) -> None:
        self.inner, self.fraction, self.sleep = inner, fraction, sleep
        self.device, self.backend = inner.device, inner.backend

    def activate_impl(self) -> None:
        self.inner.activate()

    def deactivate_impl(self) -> None:
        self.inner.deactivate()

    def infer_impl(self, images):
        return self.inner.infer(images)

    def prepare_impl(self, images):
        return self.inner.prepare(images)

    def run_prepared_impl(self, prepared) -> None:
        started = time.perf_counter()
        self.inner.run_prepared(prepared)
        finished = time.perf_counter()
        if self.sleep:
            time.sleep((finished - started) * self.fraction)
            return
        deadline = finished + (finished - started) * self.fraction
        while time.perf_counter() < deadline:
            pass

    @property
    def description(self) -> dict:
        return self.inner.description  # the same environment: only the speed changed


def _spin() -> None:
    while True:
        pass


def run_case(onnx: Path, fraction: float, batch: int, threads: int, settings: ABSettings, sleep: bool = False) -> dict:
    candidate = OnnxRuntimeRunner(onnx, threads=threads)
    runners = (
        OnnxRuntimeRunner(onnx, threads=threads),
        SlowedRunner(candidate, fraction, sleep) if fraction else candidate,
    )
    report = run_ab(onnx, onnx, batch=batch, threads=threads, settings=settings, runners=runners)
    return {
        "exit_code": report["exit_code"],
        "ratio": report["ratio"],
        "interval": report["interval"],
        "rounds": report["rounds"],
        "seconds": report["seconds"],
        "baseline_median_ms": report["baseline_median_ms"],
    }


def markdown(data: dict) -> str:
    lines = [
        "# Paired A/B gate on a loaded machine",
        "",
        f"{data['host']['cpu']} ({data['host']['cores']} cores) with {data['busy']} busy-loop processes; digits ONNX `{data['onnx']}`, "
        f"batch {data['batch']}, onnxruntime with {data['threads']} thread(s); default gate settings (fail above +{data['settings']['fail']:.0%}, "
        f"{data['settings']['confidence']:.0%} interval, at most {data['settings']['max_seconds']:.0f} s); slower candidates {data['slowdown']} "
        f"after each inference; {data['runs']} runs per case.",
        "",
        "| case | expected | pass | regression | undecided | median ratio | ratio range | median s | max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in data["cases"]:
        runs = case["runs"]
        counts = Counter(VERDICTS[r["exit_code"]] for r in runs)
        ratios = sorted(r["ratio"] for r in runs)
        seconds = sorted(r["seconds"] for r in runs)
        lines.append(
            f"| {case['name']} | {VERDICTS[case['expected']]} | {counts['pass']} | {counts['regression']} | {counts['undecided']} | "
            f"{ratios[len(ratios) // 2]:.3f} | {ratios[0]:.3f}–{ratios[-1]:.3f} | {seconds[len(seconds) // 2]:.1f} | {seconds[-1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", default="runs/digits-vit/dense.onnx", help="the digits ONNX ('make run' writes it)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2, help="background busy-loop processes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime threads (1: a loaded machine has no spare core)"
    )
    parser.add_argument(
        "--slowdown",
        choices=("spin", "sleep"),
        default="spin",
        help="how the slower candidates wait (see the module's docstring)",
    )
    args = parser.parse_args()
    onnx, settings = Path(args.onnx), ABSettings()
    if not onnx.is_file():
        raise SystemExit(f"{onnx} does not exist: run 'make run' first or pass --onnx")
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    try:
        cases = []
        for name, fraction, expected in CASES:
            runs = []
            for index in range(args.runs):
                runs.append(
                    run_case(onnx, fraction, args.batch, args.threads, settings, sleep=args.slowdown == "sleep")
                )
                last = runs[-1]
                print(
                    f"{name} {index + 1}/{args.runs}: {VERDICTS[last['exit_code']]}, ratio {last['ratio']:.3f}, {last['seconds']:.1f} s",
                    flush=True,
                )
            cases.append({"name": name, "slowdown": fraction, "expected": expected, "runs": runs})
    finally:
        for process in busy:
            process.terminate()
    data = {
        "onnx": str(onnx),
        "slowdown": args.slowdown,
        "batch": args.batch,
        "threads": args.threads,
        "busy": args.busy,
        "runs": args.runs,
        "host": host_description(),
        "settings": asdict(settings),
        "cases": cases,
    }
    name = "gate_ab" if args.slowdown == "spin" else "gate_ab_sleep"
    write_json_atomic(RESULTS / f"{name}.json", data)
    write_text_atomic(RESULTS / f"{name}.md", markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
