"""`vitslim quantize` and the default run's int8 column: an INT8 Q/DQ ONNX of an fp32 export
(export/quantize.py), calibrated on a stratified draw from the run's training data, and a report of
what it costs: top-1 on the validation set in onnxruntime for fp32 (and fp16 where given) and
int8, agreement, cosine and max abs diff against the fp32 masked PyTorch reference (or, without
the run, the fp32 ONNX, which matched it at export), Q/DQ placement, the ops kept in float and
why, and size. FILE.report.json for machines, FILE.report.md for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vitslim.core.files import write_json_atomic, write_text_atomic
from vitslim.core.precision import CALIBRATION_IMAGES, compare_outputs, tolerance_for
from vitslim.export.onnx_export import run_onnxruntime
from vitslim.export.quantize import quantize_int8
from vitslim.pruning.data import DataSplits, calibration_set


def onnx_logits(onnx_path: Path, dataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of an ONNX model over a labelled dataset, in onnxruntime on the CPU."""
    logits, labels = [], []
    for images, targets in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits.append(run_onnxruntime(onnx_path, images.numpy()))
        labels.append(targets.numpy())
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels)


def top1_of(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 (%) of [N, classes] logits against [N] labels."""
    return 100.0 * float((np.argmax(logits, axis=1) == labels).mean()) if len(labels) else 0.0


def reference_logits(model, plan, dataset, batch_size: int = 128) -> np.ndarray:
    """The fp32 masked PyTorch reference's logits over `dataset`."""
    from vitslim.pruning.reference import MaskedReference

    reference, logits = MaskedReference(model, plan).eval(), []
    with torch.no_grad():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            logits.append(reference(images.float()).numpy())
    return np.concatenate(logits)


def precision_row(precision: str, path: Path, logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
    parity = compare_outputs(reference, logits)
    tolerance = tolerance_for(precision)
    return {
        "precision": precision,
        "file": path.name,
        "mb": path.stat().st_size / 1e6,
        "top1": top1_of(logits, labels),
        "agreement": parity.top1_agreement,
        "cosine": parity.cosine,
        "max_abs_diff": parity.max_abs_diff,
        "tolerance": tolerance.to_dict(),
        "passed": parity.passes(tolerance),
    }


def quantize_and_measure(
    onnx_path: Path,
    data: DataSplits,
    out: Path,
    reference: Optional[np.ndarray] = None,
    fp16_path: Optional[Path] = None,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    fp32: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> dict:
    """Quantize `onnx_path` to `out` and write OUT.report.json/.md; `reference` is the masked
    reference's logits on data.val (default: the fp32 ONNX's); `fp32` the fp32 ONNX's
    (logits, labels) on data.val where the caller has them already (onnx_logits)."""
    calibration = calibration_set(data.train, calibration_images, seed)
    result = quantize_int8(onnx_path, out, calibration.images.numpy())
    fp32_logits, labels = fp32 if fp32 is not None else onnx_logits(onnx_path, data.val)
    against = (
        "fp32 masked PyTorch reference"
        if reference is not None
        else "fp32 ONNX (which matched the masked reference at export)"
    )
    reference = fp32_logits if reference is None else reference
    rows = [precision_row("fp32", onnx_path, fp32_logits, labels, reference)]
    if fp16_path is not None:
        rows.append(precision_row("fp16", fp16_path, onnx_logits(fp16_path, data.val)[0], labels, reference))
    rows.append(precision_row("int8", out, onnx_logits(out, data.val)[0], labels, reference))
    report = {
        **result.report,
        "data": data.source,
        "validation_images": int(len(labels)),
        "compared_with": against,
        "calibration_classes": calibration.class_histogram,
        "rows": rows,
    }
    write_json_atomic(report_path(out), report)
    write_text_atomic(report_path(out).with_suffix(".md"), quantize_markdown(report))
    return report


def report_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".report.json")


def quantize_markdown(report: dict) -> str:
    lines = [
        f"# INT8 report: {report['onnx']['file']} (from {report['source']['file']})",
        "",
        f"Calibration: {report['calibration_images']} images drawn stratified from the training split of {report['data']} "
        f"({report['calibration_method']}). Validation: {report['validation_images']} "
        f"images, onnxruntime on the CPU; parity against the {report['compared_with']}.",
        "",
        "| precision | top-1 % | top-1 agreement | min cosine | max abs diff | MB | passes its tolerance |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['top1']:.2f} | {r['agreement']:.2%} | {r['cosine']:.5f} | {r['max_abs_diff']:.2e} | {r['mb']:.2f} | {r['passed']} |"
        for r in report["rows"]
    ]
    lines += [
        "",
        f"Q/DQ: {report['quantize_linear']} QuantizeLinear, {report['dequantize_linear']} DequantizeLinear; "
        f"{report['quantized_layers']} Linear layers in INT8 (weights per channel, activations per tensor, symmetric); "
        f"DequantizeLinear feeds only {json.dumps(report['dq_consumers'])}; the {report['attention_matmuls_in_float']} attention MatMuls "
        "(Q·Kᵀ, attention·V) stay float, so MatMul → Softmax → MatMul keeps the form TensorRT fuses.",
        "",
        "| kept in float | count | why |",
        "|---|---|---|",
    ]
    lines += [f"| {op} | {entry['count']} | {entry['why']} |" for op, entry in report["float_ops"].items()]
    return "\n".join(lines) + "\n"
