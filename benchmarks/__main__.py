"""python -m benchmarks: the papers' operating points measured side by side (BENCHMARKS.md).

python -m benchmarks --gpu      # on a CUDA machine: PyTorch fp16 vs timm -> results/gpu.json
python -m benchmarks --cpu      # here: onnxruntime vs the dense ONNX, sizes -> results/cpu.json
python -m benchmarks --onnx-gpu # on a CUDA machine with onnxruntime-gpu: the exported ONNX vs timm -> results/onnx_gpu.json
python -m benchmarks --digits   # here: ToMe vs Patch Slimming top-1 on digits -> results/digits.json
python -m benchmarks --report   # BENCHMARKS.md and the PNGs from the JSON files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _merged(path: Path, new: dict) -> dict:
    """`new`, plus the rows (and sizes) already in `path` for (model, variant) pairs it did not
    measure: re-measuring one model or one variant keeps the other results (and their environment
    is the one recorded beside them in the previous file)."""
    import json

    if not path.exists():
        return new
    old = json.loads(path.read_text())
    for key in ("rows", "sizes"):
        if key in new:
            measured = {(r["model"], r["variant"]) for r in new[key]}
            new[key] = [r for r in old.get(key, []) if (r["model"], r["variant"]) not in measured] + new[key]
    if old.get("environment") != new.get("environment"):
        new["earlier_environment"] = old.get("environment")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    jobs = parser.add_argument_group("what to run (one or more)")
    jobs.add_argument("--gpu", action="store_true", help="time every point in PyTorch on the GPU against timm's model")
    jobs.add_argument(
        "--cpu",
        action="store_true",
        help="export every point, time it in onnxruntime on this CPU, build TensorRT-RTX engines",
    )
    jobs.add_argument(
        "--onnx-gpu",
        action="store_true",
        help="export every point to fp16 ONNX in each attention form and time it on onnxruntime-gpu "
        "against timm in PyTorch and timm's own ONNX",
    )
    jobs.add_argument(
        "--digits",
        action="store_true",
        help="accuracy on the digits model: ToMe against Patch Slimming, the DGSSA + GLAD point",
    )
    jobs.add_argument(
        "--report", action="store_true", help="write BENCHMARKS.md and the PNG plots from the JSON results"
    )
    parser.add_argument(
        "--model",
        action="append",
        help="timm model (repeat); default DeiT-Ti, -S and -B; results already there for what is not measured again are kept",
    )
    parser.add_argument(
        "--variant", action="append", help="only these operating points (repeat; dense is always timed); default all"
    )
    parser.add_argument(
        "--batch",
        type=int,
        action="append",
        help="batch sizes (repeat); default 1, 64, 256 on the GPU and 1, 8 on the CPU",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=("eager", "cuda_graph", "compile"),
        help="GPU modes (repeat); default cuda_graph and compile",
    )
    parser.add_argument(
        "--compile-batch", type=int, action="append", help="batches timed in compile mode (repeat); default 256"
    )
    parser.add_argument("--device", default="cuda", help="--gpu: torch device (default cuda)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"where the JSON results are written and read (default {RESULTS})"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/benchmarks"),
        help="--cpu/--digits: ONNX files, engines and runs (default runs/benchmarks)",
    )
    parser.add_argument("--no-engines", action="store_true", help="--cpu: skip the TensorRT-RTX builds")
    parser.add_argument("--seed", type=int, action="append", help="--digits: seeds (repeat; default 0)")
    args = parser.parse_args(argv)
    if not (args.gpu or args.cpu or args.onnx_gpu or args.digits or args.report):
        parser.error("choose at least one of --gpu, --cpu, --onnx-gpu, --digits, --report")
    from vitslim.core.files import write_json_atomic

    from . import timing

    models = args.model or list(timing.MODELS)
    if args.gpu:
        rows = timing.time_gpu(
            models,
            args.mode or ["cuda_graph", "compile"],
            args.batch or [1, 64, 256],
            args.compile_batch or [256],
            device=args.device,
            variants=args.variant,
        )
        write_json_atomic(
            args.results / "gpu.json",
            _merged(
                args.results / "gpu.json",
                {
                    "environment": timing.environment(args.device),
                    "dtype": "fp16",
                    "settings": timing.GPU_SETTINGS.__dict__,
                    "rows": rows,
                },
                models,
            ),
        )
    if args.cpu:
        rows, sizes = timing.time_cpu(
            models, args.batch or [1, 8], args.work / "onnx", engines=not args.no_engines, variants=args.variant
        )
        write_json_atomic(
            args.results / "cpu.json",
            _merged(
                args.results / "cpu.json",
                {
                    "environment": timing.environment("cpu"),
                    "dtype": "fp32",
                    "settings": timing.CPU_SETTINGS.__dict__,
                    "rows": rows,
                    "sizes": sizes,
                },
            ),
        )
    if args.onnx_gpu:
        from . import onnx_gpu

        def save(rows: list) -> None:  # after every row: a device call cut short keeps what it measured
            write_json_atomic(
                args.results / "onnx_gpu.json",
                {
                    "environment": timing.environment("cuda"),
                    "dtype": "fp16",
                    "settings": onnx_gpu.SETTINGS.__dict__,
                    "parity_images": onnx_gpu.PARITY_IMAGES,
                    "rows": rows,
                },
            )

        save(
            onnx_gpu.time_onnx_gpu(
                args.work / "onnx_gpu",
                args.model or onnx_gpu.ONNX_MODELS,
                args.batch or [64, 256],
                args.variant or onnx_gpu.ONNX_VARIANTS,
                on_row=save,
            )
        )
    if args.digits:
        from .digits import digits_study

        write_json_atomic(
            args.results / "digits.json",
            digits_study(args.work / "digits", args.seed or [0], args.results / "gpu.json"),
        )
    if args.report:
        from .report import write_report

        write_report(args.results, Path("BENCHMARKS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
