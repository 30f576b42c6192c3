"""What we ship, on a GPU runtime: the exported fp16 ONNX of each operating point on
onnxruntime-gpu (CUDA provider, IO bound to device memory, CUDA graphs), in each attention form,
beside timm's own model in PyTorch (CUDA graphs) and timm's own model exported to ONNX (opset 23)
and run the same way, all in one process. Parity of every timed ONNX against the fp32 compact
module on the GPU is recorded beside its time.

    python -m benchmarks --onnx-gpu     # on a CUDA machine with onnxruntime-gpu -> results/onnx_gpu.json
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from vitslim.deploy.bench import BenchSettings, benchmark, speedup_columns
from vitslim.deploy.runners import OnnxRuntimeRunner, TorchRunner
from vitslim.export.compact import compact_from_plan

from vitslim.core.precision import compare_outputs

from .timing import images_for, points_of, random_model

ONNX_MODELS = ("deit_small_patch16_224",)
ONNX_VARIANTS = ("dense", "patch-slim", "vtp 40%", "dgssa-glad 4s 7:1/2,10:1/4", "dgssa-glad 1s 1:1/8,4:1/16")
# (label, attention form, extra graph passes): every form, and onnxruntime's fusions on the fastest
ONNX_EXPORTS = (
    ("attention-op", "attention-op", ()),
    ("matmul-softmax", "matmul-softmax", ()),
    ("ort-mha", "ort-mha", ()),
    ("ort-mha + ort_fusions", "ort-mha", ("ort_fusions",)),
)
SETTINGS = BenchSettings(warmup_seconds=0.3, min_seconds=0.6, min_iterations=20, max_rounds=2)
PARITY_IMAGES = 256

Progress = Callable[[str], None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.-]+", "_", text)


def timm_onnx(model: torch.nn.Module, path: Path) -> Path:
    """timm's own model exported by torch at opset 23 (SDPA becomes the ONNX Attention op), fp16:
    the ONNX a user would make without vitslim."""
    import onnx
    from vitslim.export.onnx_export import onnx_from_module
    from vitslim.export.passes import apply_passes
    from vitslim.export.precision import fp16_from_fp32

    from vitslim.core.files import atomic_path

    example = torch.randn(2, 3, *model.patch_embed.img_size)
    with atomic_path(path) as tmp:
        exported = apply_passes(onnx_from_module(model.float().cpu().eval(), example, tmp, opset=23))
        onnx.save(apply_passes(fp16_from_fp32(exported), ("toposort",)), str(tmp))
    return path


def _gpu_parity(runner: OnnxRuntimeRunner, reference: np.ndarray, images: np.ndarray) -> dict:
    parity = compare_outputs(reference, runner.infer(images))
    return {
        "max_abs_diff": parity.max_abs_diff,
        "cosine": parity.cosine,
        "top1_agreement": parity.top1_agreement,
        "images": len(images),
    }


def _row(
    name: str,
    variant: str,
    label: str,
    result: dict,
    macs_fraction: float,
    timm_torch_ms: float,
    timm_onnx_ms: Optional[float],
    **extra,
) -> dict:
    against_onnx = speedup_columns(timm_onnx_ms, result["median_ms"], macs_fraction) if timm_onnx_ms else {}
    return {
        "model": name,
        "variant": variant,
        "graph": label,
        "batch": result["batch"],
        "macs_fraction": macs_fraction,
        "median_ms": result["median_ms"],
        "p90_ms": result["p90_ms"],
        "p99_ms": result["p99_ms"],
        "cov": result["cov"],
        **speedup_columns(timm_torch_ms, result["median_ms"], macs_fraction),
        "speedup_over_timm_onnx": against_onnx.get("speedup"),
        "realised_over_ideal_vs_timm_onnx": against_onnx.get("realised_over_ideal"),
        **extra,
    }


def _time_onnx(path: Path, images: np.ndarray, label: str) -> dict:
    with OnnxRuntimeRunner(path, device="cuda", cuda_graph=True) as runner:
        return benchmark(runner, images, "fp16", None, SETTINGS, label=label)


def _time_torch(module: torch.nn.Module, images: np.ndarray, label: str) -> dict:
    # a copy: the runner moves its module to the GPU in fp16, and the exports read the fp32 model
    with TorchRunner(copy.deepcopy(module), "cuda", "cuda_graph", "fp16") as runner:
        return benchmark(runner, images, "fp16", None, SETTINGS, label=label)


def time_onnx_gpu(
    directory: Path,
    models: Iterable[str] = ONNX_MODELS,
    batches: Iterable[int] = (64, 256),
    variants: Iterable[str] = ONNX_VARIANTS,
    exports=ONNX_EXPORTS,
    progress: Progress = print,
    on_row: Optional[Callable[[list], None]] = None,
) -> list[dict]:
    """Rows per model, point, graph and batch; `on_row(rows)` after each (to save partial results)."""
    from vitslim.export.onnx_export import export_plan

    rows: list[dict] = []
    directory.mkdir(parents=True, exist_ok=True)
    batches = list(batches)
    for name in models:
        model, spec = random_model(name)
        parity_images = images_for(model, PARITY_IMAGES)
        timm_path = timm_onnx(model, directory / f"{name}-timm.onnx")
        baselines = {}
        for batch in batches:
            timm = _time_torch(model, images_for(model, batch), "timm")
            onnx_result = _time_onnx(timm_path, images_for(model, batch), "timm onnx")
            baselines[batch] = (timm["median_ms"], onnx_result["median_ms"])
            rows.append(
                _row(
                    name, "dense", "timm (PyTorch, CUDA graphs)", timm, 1.0, timm["median_ms"], onnx_result["median_ms"]
                )
            )
            rows.append(
                _row(
                    name, "dense", "timm ONNX (opset 23)", onnx_result, 1.0, timm["median_ms"], onnx_result["median_ms"]
                )
            )
            progress(
                f"[onnx-gpu {name} b{batch}] timm {timm['median_ms']:.3f} ms, timm ONNX {onnx_result['median_ms']:.3f} ms"
            )
        variants = list(variants)
        for point in points_of(model, spec, layouts=False, variants=variants):
            if point.plan is None or point.variant not in variants:  # points_of always adds dense
                continue
            compact = compact_from_plan(model, point.plan, point.token_layout, point.channel_layout)
            with torch.no_grad():  # the fp32 reference every fp16 graph is held to
                reference = copy.deepcopy(compact).cuda()(torch.from_numpy(parity_images).cuda()).cpu().numpy()
            for batch in batches:
                rows.append(
                    _row(
                        name,
                        point.variant,
                        "compact module (PyTorch, CUDA graphs)",
                        _time_torch(compact, images_for(model, batch), "compact"),
                        point.macs_fraction,
                        *baselines[batch],
                    )
                )
            for label, form, passes in exports:
                path = directory / f"{name}-{_slug(point.variant)}-{_slug(label)}.onnx"
                started = time.perf_counter()
                report = export_plan(
                    model,
                    point.plan,
                    path,
                    precision="fp16",
                    attention=form,
                    extra_passes=passes,
                    token_layout=point.token_layout,
                    channel_layout=point.channel_layout,
                ).report
                export_seconds = time.perf_counter() - started
                with OnnxRuntimeRunner(path, device="cuda", cuda_graph=True) as runner:
                    parity = _gpu_parity(runner, reference, parity_images)
                    for batch in batches:
                        result = benchmark(runner, images_for(model, batch), "fp16", None, SETTINGS, label=label)
                        row = _row(
                            name,
                            point.variant,
                            f"ONNX fp16 {label}",
                            result,
                            point.macs_fraction,
                            *baselines[batch],
                            attention_form=form,
                            passes=report["passes"],
                            ops={k: v for k, v in report["ops"].items() if k in SHOWN_OPS},
                            gpu_parity=parity,
                            export_seconds=export_seconds,
                        )
                        rows.append(row)
                        progress(
                            f"[onnx-gpu {name} b{batch}] {point.variant} {label}: {row['median_ms']:.3f} ms, {row['speedup']:.2f}x timm, "
                            f"{row['speedup_over_timm_onnx']:.2f}x timm ONNX (ideal {row['mac_ideal']:.2f}x); top-1 agreement {parity['top1_agreement']:.3f}"
                        )
                        if on_row:
                            on_row(rows)
    return rows


SHOWN_OPS = (
    "Attention",
    "MultiHeadAttention",
    "Softmax",
    "Cast",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "Gather",
    "Pad",
)
