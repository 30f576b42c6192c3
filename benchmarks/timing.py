"""Timing the operating points: PyTorch on a GPU against timm's own model, onnxruntime on this
CPU against the exported dense ONNX, and artifact sizes (ONNX, TensorRT-RTX engine)."""

from __future__ import annotations

import datetime
import platform
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from vitslim.deploy.bench import BenchSettings, benchmark, host_description, speedup_columns
from vitslim.deploy.runners import OnnxRuntimeRunner, TorchRunner
from vitslim.export.compact import compact_from_plan
from vitslim.pruning.models import create_model
from vitslim.pruning.plan import ModelSpec, dense_plan
from vitslim.pruning.timm_adapter import count_params

from .operating_points import OperatingPoint, operating_points
from .tome import DATA_DEPENDENT_OPS, ToMe

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
LAYOUT_MODEL = "deit_small_patch16_224"  # the alternative layouts, the DGSSA ladder's target, compile mode
GPU_SETTINGS = BenchSettings(warmup_seconds=0.2, min_seconds=0.5, min_iterations=20, max_rounds=2)
CPU_SETTINGS = BenchSettings(warmup_seconds=0.5, min_seconds=2.0, min_iterations=5, max_rounds=2)
# compile mode (about 25 s of compilation per module and batch on an H100 host) times only the
# papers' points of LAYOUT_MODEL, so that the GPU part fits one 10-minute device call
COMPILED_VARIANTS = ("dense", "patch-slim", "vtp 20%", "vtp 40%", "dgssa-glad 4s 7:1/2,10:1/4", "tome")

Progress = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def random_model(name: str, **kwargs) -> tuple[nn.Module, ModelSpec]:
    """timm's `name` with seeded random weights (latency does not depend on them)."""
    spec = ModelSpec(name, kwargs)
    torch.manual_seed(0)
    return create_model(spec).eval(), spec


def points_of(
    model: nn.Module, spec: ModelSpec, layouts: bool, variants: Optional[Iterable[str]] = None
) -> list[OperatingPoint]:
    """The operating points of `model` (all, or those named in `variants`; dense always, first)."""
    points = operating_points(model, dense_plan(spec, len(model.blocks)), layouts=layouts)
    return [p for p in points if variants is None or p.variant == "dense" or p.variant in set(variants)]


def module_of(model: nn.Module, point: OperatingPoint) -> nn.Module:
    """What is timed: timm's own model for dense, the compact module of a plan, or ToMe."""
    if point.variant == "dense":
        return model
    if point.tome_schedule is not None:
        return ToMe(model, point.tome_schedule, point.tome_scatter)
    return compact_from_plan(model, point.plan, point.token_layout, point.channel_layout)


def images_for(model: nn.Module, batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, *model.patch_embed.img_size)).astype(np.float32)


def _row(model: str, backend: str, mode: str, point: OperatingPoint, result: dict, baseline_ms: float) -> dict:
    return {
        "model": model,
        "backend": backend,
        "mode": mode,
        "batch": result["batch"],
        "variant": point.variant,
        "method": point.method,
        "gmacs": point.macs / 1e9,
        "macs_fraction": point.macs_fraction,
        "median_ms": result["median_ms"],
        "p90_ms": result["p90_ms"],
        "p99_ms": result["p99_ms"],
        "cov": result["cov"],
        "throughput_per_s": result["throughput_per_s"],
        "setup_seconds": result["setup_seconds"],
        **speedup_columns(baseline_ms, result["median_ms"], point.macs_fraction),
    }


def time_gpu(
    models: Iterable[str],
    modes: Iterable[str],
    batches: Iterable[int],
    compile_batches: Iterable[int],
    compile_models: Iterable[str] = (LAYOUT_MODEL,),
    dtype: str = "fp16",
    device: str = "cuda",
    settings: BenchSettings = GPU_SETTINGS,
    progress: Progress = _print,
    model_kwargs: Optional[dict] = None,
    variants: Optional[Iterable[str]] = None,
) -> list[dict]:
    """Every point of every model, per mode and batch, against timm's model timed the same way in
    this process (the dense row, always timed first)."""
    rows = []
    for name in models:
        model, spec = random_model(name, **(model_kwargs or {}))
        points = points_of(model, spec, layouts=name == LAYOUT_MODEL, variants=variants)
        modules = [(point, module_of(model, point)) for point in points]
        for mode in modes:
            for batch in compile_batches if mode == "compile" else batches:
                dense_ms = None
                for point, module in modules:
                    if mode == "compile" and (point.variant not in COMPILED_VARIANTS or name not in compile_models):
                        continue
                    with TorchRunner(module, device, mode, dtype) as runner:
                        result = benchmark(runner, images_for(model, batch), dtype, None, settings, label=point.variant)
                    dense_ms = dense_ms or result["median_ms"]
                    row = _row(name, "torch", mode, point, result, dense_ms)
                    rows.append(row)
                    progress(
                        f"[gpu {name} {mode} b{batch}] {point.variant}: {row['median_ms']:.3f} ms, {row['speedup']:.2f}x timm (ideal {row['mac_ideal']:.2f}x)"
                    )
    return rows


def _export(model: nn.Module, point: OperatingPoint, path: Path) -> dict:
    """Export a plan point (parity-checked against the masked reference) and return its sizes."""
    from vitslim.export.onnx_export import export_plan

    result = export_plan(model, point.plan, path, token_layout=point.token_layout, channel_layout=point.channel_layout)
    ops = result.report["ops"]
    # params of the physically slim module (the masked channel layout keeps zero columns in the file)
    params = count_params(compact_from_plan(model, point.plan))
    return {
        "params": params,
        "onnx_bytes": result.report["onnx"]["bytes"],
        "data_dependent_ops": {op: ops[op] for op in DATA_DEPENDENT_OPS if ops.get(op)},
        "gathers": ops.get("Gather", 0),
    }


def build_engine_sizes(onnx_path: Path, engine_path: Path) -> dict:
    """TensorRT-RTX (or TensorRT) engine bytes and build seconds for `onnx_path`, or why not."""
    from vitslim.deploy.build import BuildSettings, engine_from_onnx
    from vitslim.deploy.errors import DeployError

    try:
        built = engine_from_onnx(onnx_path, engine_path, BuildSettings(precision="fp32"))
    except DeployError as error:
        return {"engine_error": str(error)}
    return {
        "engine_bytes": built.manifest["engine"]["bytes"],
        "engine_build_seconds": built.manifest["build_seconds"],
        "engine_library": f"{built.manifest['library']} {built.manifest['version']}",
    }


def time_cpu(
    models: Iterable[str],
    batches: Iterable[int],
    directory: Path,
    settings: BenchSettings = CPU_SETTINGS,
    engines: bool = True,
    progress: Progress = _print,
    model_kwargs: Optional[dict] = None,
    variants: Optional[Iterable[str]] = None,
) -> tuple[list[dict], list[dict]]:
    """Export every point to ONNX (fp32) and time it in onnxruntime on this CPU against the dense
    ONNX; also sizes per point (params, MACs, ONNX and engine bytes). Returns (rows, sizes)."""
    from .tome import export_tome

    rows, sizes = [], []
    directory.mkdir(parents=True, exist_ok=True)
    for name in models:
        model, spec = random_model(name, **(model_kwargs or {}))
        files = []
        for point in points_of(model, spec, layouts=name == LAYOUT_MODEL, variants=variants):
            path = directory / f"{name}-{re.sub(r'[^A-Za-z0-9=.-]+', '_', point.variant)}.onnx"
            started = time.perf_counter()
            path.unlink(missing_ok=True)  # a failed export must not leave an older file to be timed
            if point.tome_schedule is not None:
                size = export_tome(model, point.tome_schedule, path, point.tome_scatter)
            else:
                size = _export(model, point, path)
            size.update(
                model=name,
                variant=point.variant,
                gmacs=point.macs / 1e9,
                macs_fraction=point.macs_fraction,
                export_seconds=time.perf_counter() - started,
                structure={
                    **point.notes,
                    **({"tome_schedule": list(point.tome_schedule)} if point.tome_schedule else {}),
                },
            )
            if engines and path.exists():
                size.update(build_engine_sizes(path, path.with_suffix(".engine")))
            sizes.append(size)
            progress(
                f"[cpu {name}] exported {point.variant} ({size.get('onnx_bytes', 0) / 1e6:.1f} MB) in {size['export_seconds']:.0f} s"
            )
            if path.exists():
                files.append((point, path))
        for batch in batches:
            dense_ms = None
            for point, path in files:
                with OnnxRuntimeRunner(path) as runner:
                    result = benchmark(runner, images_for(model, batch), "fp32", None, settings, label=point.variant)
                dense_ms = dense_ms or result["median_ms"]
                row = _row(name, "onnxruntime", "cpu", point, result, dense_ms)
                rows.append(row)
                progress(
                    f"[cpu {name} b{batch}] {point.variant}: {row['median_ms']:.1f} ms, {row['speedup']:.2f}x dense ONNX (ideal {row['mac_ideal']:.2f}x)"
                )
    return rows, sizes


def environment(device: str) -> dict:
    import onnxruntime
    import timm

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "host": host_description(),
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            compute_capability=f"{properties.major}.{properties.minor}",
            sm_count=properties.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return env
