"""Where the GPU time goes: CUDA kernel time per category for timm's model and each operating
point (eager mode under torch.profiler; kernel durations are those CUDA graphs replay).

    python -m benchmarks.profile [--model deit_small_patch16_224] [--batch 256] [--variant patch-slim ...]
"""

from __future__ import annotations

import argparse
import re

import torch

from .timing import images_for, module_of, points_of, random_model

CATEGORIES = (  # first match wins; kernel names differ by library version, hence the loose patterns
    ("attention", r"flash|fmha|attention|softmax"),
    ("gemm", r"gemm|cutlass|sm\d+_xmma|ampere|hopper|nvjet|matmul|wgrad|cublas"),
    ("layernorm", r"layer_norm|layernorm"),
    ("gather / index / copy / cat", r"index|gather|scatter|copy|cat|Cat|direct_copy"),
    ("gelu", r"gelu"),
    ("elementwise (add, mul, bias)", r"elementwise|vectorized|add|mul"),
)


def category_of(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if re.search(pattern, kernel, re.IGNORECASE)), "other")


def kernel_times(module: torch.nn.Module, images: torch.Tensor, iterations: int = 5) -> dict[str, float]:
    """Milliseconds per forward by category (mean over `iterations` after warm-up)."""
    with torch.no_grad():
        for _ in range(3):
            module(images)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for _ in range(iterations):
                module(images)
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[category_of(event.key)] = totals.get(category_of(event.key), 0.0) + device_us / 1000 / iterations
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--variant", action="append", help="operating points to profile (repeat); default all")
    args = parser.parse_args(argv)
    model, spec = random_model(args.model)
    points = [
        p
        for p in points_of(model, spec, layouts=True)
        if args.variant is None or p.variant in args.variant or p.variant == "dense"
    ]
    images = torch.as_tensor(images_for(model, args.batch)).cuda().half()
    rows = {
        p.variant: (p.macs_fraction, kernel_times(module_of(model, p).cuda().half().eval(), images)) for p in points
    }
    categories = sorted({c for _, times in rows.values() for c in times}, key=lambda c: -rows["dense"][1].get(c, 0))
    print(f"{args.model}, batch {args.batch}, fp16, kernel ms per forward (eager)")
    print("| variant | MACs | total | " + " | ".join(categories) + " |")
    print("|---|---|---|" + "---|" * len(categories))
    for variant, (fraction, times) in rows.items():
        print(
            f"| {variant} | {fraction:.1%} | {sum(times.values()):.2f} | "
            + " | ".join(f"{times.get(c, 0):.2f}" for c in categories)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
