"""Compact export: (model, plan) -> physically slim module -> ONNX -> graph passes -> checks -> report.

Batch is the only dynamic dimension. The exporter is torch's dynamo exporter: it emits
LayerNormalization, Gelu (opset >= 20), Gather/Slice and attention in the chosen form
(export/attention_form.py: the ONNX Attention op at opset 23, or MatMul -> Softmax -> MatMul).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn
from vitslim.pruning.checkpoints import weights_digest
from vitslim.pruning.macs import block_widths, plan_macs
from vitslim.pruning.plan import SlimPlan, dense_plan, plan_digest, token_counts, validate
from vitslim.pruning.reference import MaskedReference
from vitslim.pruning.timm_adapter import count_params, input_shape_of, supported_geometry

from vitslim.core.files import atomic_path, sha256_of
from vitslim.core.metadata import ATTENTION_FORM_KEY, PREPROCESSING_KEY, write_metadata
from vitslim.core.precision import PRECISIONS, Tolerance, compare_outputs, tolerance_for

from .attention_form import DEFAULT_ATTENTION_FORM, AttentionForm, attention_form
from .compact import compact_from_plan
from .errors import ExportError
from .passes import DEFAULT_PASSES, apply_passes
from .precision import fp16_from_fp32
from .report import REPORT_VERSION, io_shapes, matmul_weight_shapes, op_inventory, write_report

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PARITY_BATCH = 8


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    report_path: Path
    report: dict


def onnx_from_module(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> onnx.ModelProto:
    """Export `module` (images [B, C, H, W] -> logits [B, classes]) with a dynamic batch axis."""
    if example.shape[0] < 2:
        raise ExportError("trace with batch >= 2 so that the exporter keeps batch symbolic")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
            optimize=True,
            external_data=False,
        )
    return onnx.load(str(path))


def run_onnxruntime(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the ONNX model at `path` on the CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})[0]


def parity_images(
    model: nn.Module, images: Optional[torch.Tensor], batch: int = PARITY_BATCH, seed: int = 0
) -> torch.Tensor:
    """The given images (first `batch`), or seeded standard-normal images of the model's input size."""
    if images is not None and len(images) >= 2:
        return images[:batch].float()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape_of(model), generator=generator)


def block_rows(plan: SlimPlan, geometry) -> list[dict]:
    """Per block: tokens, widths, static/aggregation flags and MACs (for the report)."""
    macs = plan_macs(plan, geometry)["blocks"]
    rows = []
    for index, (block, counts) in enumerate(zip(plan.blocks, token_counts(plan, geometry))):
        widths = block_widths(block, geometry)
        rows.append(
            {
                "block": index,
                "tokens_in": counts.read,
                "tokens_out": counts.written,
                "qkv_in": widths.qkv_in,
                "value_per_head": widths.value_per_head,
                "fc1_in": widths.fc1_in,
                "hidden": widths.hidden,
                "static_attention": block.static_attention is not None,
                "aggregated_to": None if block.token_aggregation is None else block.token_aggregation.shape[0],
                "macs": macs[index],
            }
        )
    return rows


def _versions() -> dict:
    import onnxruntime
    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _check_graph(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"exported graph fails onnx.checker: {str(error).splitlines()[0]}") from None
    for name, shape in io_shapes(model).items():
        if not shape or not isinstance(shape[0], str) or any(isinstance(d, str) or d == 0 for d in shape[1:]):
            raise ExportError(f"graph {name} has shape {shape}: only the batch dimension may be dynamic")


def onnx_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    form: AttentionForm,
    passes: tuple[str, ...] = DEFAULT_PASSES,
    extra_passes: tuple[str, ...] = (),
    precision: str = "fp32",
) -> onnx.ModelProto:
    """`module` as vitslim ships it: exported at the form's opset, the graph passes, the form's own
    passes before the others' (onnxruntime's fusions need the form's MultiHeadAttention to infer
    shapes), converted to `precision`, checked to hold no data-dependent op. Written to `path`
    by the exporter; the caller saves the returned graph (with its metadata) over it."""
    exported = apply_passes(
        onnx_from_module(module, example, path, form.opset), tuple(passes) + form.passes + tuple(extra_passes)
    )
    if precision == "fp16":
        exported = apply_passes(fp16_from_fp32(exported), ("toposort",))
    _check_graph(exported)
    return exported


def export_plan(
    model: nn.Module,
    plan: SlimPlan,
    out_path: str | Path,
    images: Optional[torch.Tensor] = None,
    tolerance: Optional[Tolerance | float] = None,
    passes: tuple[str, ...] = DEFAULT_PASSES,
    token_layout: str = "gather",
    precision: str = "fp32",
    channel_layout: str = "gather",
    images_source: Optional[str] = None,
    preprocessing: Optional[dict] = None,
    attention: str = DEFAULT_ATTENTION_FORM,
    extra_passes: tuple[str, ...] = (),
) -> ExportResult:
    """Write a slim ONNX for `plan` on `model` plus FILE.report.json/.md; refuse on parity failure.

    `images_source` says where `images` came from (recorded in the report's parity entry);
    `preprocessing` (pruning.data.preprocessing) travels in the ONNX metadata as
    PREPROCESSING_KEY and in the report. `attention` names the attention form (ATTENTION_FORMS);
    it travels as ATTENTION_FORM_KEY. Graph passes run in the order `passes`, the form's own,
    `extra_passes` (onnxruntime's fusions need the form's MultiHeadAttention to infer shapes).

    Nothing is left at `out_path` unless every check passed. `precision="fp16"` converts the
    whole graph (export/precision.py). Parity against the masked reference is held to
    `tolerance`: by default the precision's entry of vitslim.core.precision.TOLERANCES; a float replaces
    its fp32 max abs diff bound.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {PRECISIONS}")
    if isinstance(tolerance, (int, float)):
        if precision != "fp32":
            raise ExportError(
                f"a max abs diff tolerance applies to fp32 exports; {precision} is held to {tolerance_for(precision).to_dict()}"
            )
        tolerance = replace(tolerance_for(precision), max_abs_diff=float(tolerance))
    tolerance = tolerance or tolerance_for(precision)
    form = attention_form(attention)
    started = time.perf_counter()
    out_path = Path(out_path)
    geometry = supported_geometry(model)
    validate(plan, geometry)
    model = model.eval().float().cpu()
    compact = compact_from_plan(model, plan, token_layout, channel_layout, pad_value_heads=form.pad_value_heads)
    inputs = parity_images(model, images)
    with torch.no_grad():
        reference = MaskedReference(model, plan)(inputs).numpy()
    with atomic_path(out_path) as tmp:
        exported = onnx_graph(compact, inputs[:2], tmp, form, passes, extra_passes, precision)
        metadata = {
            ATTENTION_FORM_KEY: form.name,
            **({} if preprocessing is None else {PREPROCESSING_KEY: json.dumps(preprocessing, sort_keys=True)}),
        }
        write_metadata(exported, metadata)
        onnx.save(exported, str(tmp))
        parity = compare_outputs(reference, run_onnxruntime(tmp, inputs.numpy()))
        if not parity.passes(tolerance):
            raise ExportError(
                f"{precision} ONNX differs from the masked reference beyond {tolerance.to_dict()} (max abs diff {parity.max_abs_diff:.3e}, "
                f"top-1 agreement {parity.top1_agreement:.1%}); nothing written"
            )
        onnx_bytes = tmp.stat().st_size
        digest = sha256_of(tmp)
    macs_dense = plan_macs(dense_plan(plan.model, geometry.depth), geometry)["total"]
    report = {
        "report_version": REPORT_VERSION,
        "model": plan.model.to_dict(),
        # what it was made from: `compare RUN --onnx FILE` checks these against the run's
        "made_from": {"weights_digest": weights_digest(model), "plan_digest": plan_digest(plan)},
        "method": plan.method,
        "token_layout": token_layout,
        "channel_layout": channel_layout,
        "macs_dense": macs_dense,
        "macs": plan_macs(plan, geometry)["total"],
        "params_dense": count_params(model),
        "params": count_params(compact),
        "ops": op_inventory(exported),
        "weight_shapes": matmul_weight_shapes(exported),
        "precision": precision,
        "preprocessing": preprocessing,
        "attention_form": form.name,
        "passes": [*passes, *form.passes, *extra_passes],
        "parity": {
            **parity.to_dict(),
            "tolerance": tolerance.to_dict(),
            "reference": "masked PyTorch (fp32, CPU)",
            "runtime": "onnxruntime CPU",
            "images": f"{len(inputs)} "
            + (
                images_source
                or ("seeded standard-normal images" if images is None or len(images) < 2 else "given images")
            ),
        },
        "blocks": block_rows(plan, geometry),
        "onnx": {
            "file": out_path.name,
            "bytes": onnx_bytes,
            "sha256": digest,
            "opset": form.opset,
            "io": io_shapes(exported),
        },
        "export_seconds": time.perf_counter() - started,
        "versions": _versions(),
    }
    report_path, _ = write_report(report, out_path)
    log.info(
        "exported %s (%.1f%% of dense MACs) in %.1f s",
        out_path,
        100 * report["macs"] / macs_dense,
        report["export_seconds"],
    )
    return ExportResult(onnx_path=out_path, report_path=report_path, report=report)
