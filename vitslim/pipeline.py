"""Orchestration for the CLI: train a run directory, export it, and run a whole recipe."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from export.onnx_export import ExportResult, export_plan, run_onnxruntime
from pruning.atomic import write_text_atomic
from pruning.data import DataSplits, calibration_batch, load_data
from pruning.errors import PruningError
from pruning.models import model_from_checkpoint
from pruning.plan import ModelSpec, dense_plan
from pruning.run_dir import save_run
from pruning.timm_adapter import input_shape_of
from pruning.train import TrainConfig, config_dict, fit, is_main_process

from .plots import block_macs_png, training_curve_png
from .recipe import Recipe

log = logging.getLogger(__name__)


def data_for(model: nn.Module, source: str) -> DataSplits:
    """Load `source` at the model's input size and check that the class counts agree."""
    in_chans, height, width = input_shape_of(model)
    data = load_data(source, in_chans, (height, width))
    if model.num_classes != data.num_classes:
        raise PruningError(
            f"model has {model.num_classes} classes but data {data.source!r} has {data.num_classes}: "
            f"pass --model-kwargs num_classes={data.num_classes}"
        )
    return data


def train_run(spec: ModelSpec, data_source: str, config: TrainConfig, out: Path, checkpoint: Optional[str] = None, pretrained: bool = False) -> dict:
    """Fine-tune the dense model and write a run directory (dense plan + weights + info + curve)."""
    model = model_from_checkpoint(spec, checkpoint, pretrained)
    data = data_for(model, data_source)
    result = fit(model, data, config, checkpoint_path=out / "checkpoint-last.safetensors")
    info = {"model": spec.to_dict(), "data": data.source, "train": config_dict(config), "history": list(result.history), "val_top1": result.val_top1}
    if not is_main_process():
        return info
    save_run(out, dense_plan(spec, len(model.blocks)), model.cpu(), info)
    if result.history:
        training_curve_png(list(result.history), out / "training.png", f"{spec.name} on {data.source}")
    (out / "checkpoint-last.safetensors").unlink(missing_ok=True)
    return info


def onnx_top1(onnx_path: Path, dataset, batch_size: int = 128) -> float:
    """Top-1 (%) of an ONNX model on a labelled dataset, in onnxruntime."""
    correct = total = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits = run_onnxruntime(onnx_path, images.numpy())
        correct += int((np.argmax(logits, axis=1) == labels.numpy()).sum())
        total += len(labels)
    return 100.0 * correct / max(1, total)


def summary_row(variant: str, export: ExportResult, pytorch_top1: Optional[float], onnx_top1_value: Optional[float]) -> dict:
    report = export.report
    return {
        "variant": variant, "method": report["method"], "macs": report["macs"], "macs_fraction": report["macs"] / report["macs_dense"],
        "params": report["params"], "pytorch_top1": pytorch_top1, "onnx_top1": onnx_top1_value,
        "max_abs_diff": report["parity"]["max_abs_diff"], "onnx_mb": report["onnx"]["bytes"] / 1e6, "onnx": str(export.onnx_path),
    }


def summary_markdown(title: str, rows: list[dict]) -> str:
    def pct(value):
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        f"# {title}", "",
        "| variant | method | MMACs | % of dense | params | top-1 PyTorch | top-1 ONNX | max abs diff | ONNX MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['method']} | {r['macs'] / 1e6:.2f} | {100 * r['macs_fraction']:.1f} | {r['params']:,} | "
        f"{pct(r['pytorch_top1'])} | {pct(r['onnx_top1'])} | {r['max_abs_diff']:.1e} | {r['onnx_mb']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def run_recipe(recipe: Recipe) -> dict:
    """Train the dense model, export it with parity checked, and write the summary under runs/NAME."""
    started = time.perf_counter()
    root = recipe.run_root
    dense_dir = root / "dense"
    info = train_run(recipe.model, recipe.data, recipe.train, dense_dir, recipe.checkpoint, recipe.pretrained)
    from pruning.run_dir import load_run

    plan, model = load_run(dense_dir)
    data = data_for(model, recipe.data)
    export = export_plan(model, plan, root / "dense.onnx", images=calibration_batch(data.val, 8))
    rows = [summary_row("dense", export, info["val_top1"], onnx_top1(export.onnx_path, data.val))]
    summary = {"recipe": recipe.name, "data": data.source, "rows": rows, "seconds": time.perf_counter() - started}
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=1))
    write_text_atomic(root / "summary.md", summary_markdown(f"vitslim run: {recipe.name}", rows))
    block_macs_png({"dense": export.report["blocks"]}, root / "block_macs.png", f"{recipe.name}: MACs per block")
    return summary
