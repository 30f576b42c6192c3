"""The export report: params, MACs, op inventory, weight shapes and parity, as JSON and Markdown.

The JSON sits beside the model as FILE.report.json with at least the keys macs_dense, macs,
params, ops and parity, for CI scripts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

from vitslim.core.files import write_text_atomic


def op_inventory(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count over the main graph, most frequent first."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def matmul_weight_shapes(model: onnx.ModelProto) -> list[dict]:
    """Every constant operand of a Gemm/MatMul: node name, op, input slot and shape."""
    constants = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            constants[node.output[0]] = list(numpy_helper.to_array(node.attribute[0].t).shape)
    return [
        {"node": node.name, "op": node.op_type, "input": slot, "shape": constants[name]}
        for node in model.graph.node
        if node.op_type in ("Gemm", "MatMul")
        for slot, name in enumerate(node.input)
        if name in constants
    ]


def io_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Input/output name -> shape with symbolic dimensions as their names."""

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {v.name: shape(v) for v in list(model.graph.input) + list(model.graph.output)}


def report_paths(onnx_path: Path) -> tuple[Path, Path]:
    """FILE.onnx -> (FILE.report.json, FILE.report.md)."""
    return onnx_path.with_suffix(".report.json"), onnx_path.with_suffix(".report.md")


def markdown_report(report: dict) -> str:
    parity = report["parity"]
    lines = [
        f"# Export report: {report['model']['name']} ({report['method']})",
        "",
        f"- ONNX: `{report['onnx']['file']}` ({report['onnx']['bytes'] / 1e6:.2f} MB, opset {report['onnx']['opset']}), I/O shapes {report['onnx']['io']}",
        f"- Params: {report['params']:,} (dense {report['params_dense']:,}, {report['params'] / report['params_dense']:.1%})",
        f"- MACs: {report['macs']:,} (dense {report['macs_dense']:,}, {report['macs'] / report['macs_dense']:.1%})",
        f"- Parity vs masked PyTorch reference in onnxruntime (batch {parity['batch']}): max abs diff {parity['max_abs_diff']:.2e} "
        f"(tolerance {parity['tolerance']}), cosine {parity['cosine']:.6f}, top-1 agreement {parity['top1_agreement']:.1%}",
        f"- Export time: {report['export_seconds']:.1f} s",
        "",
        "## Blocks",
        "",
        "| block | tokens in → out | qkv in | value/head | fc1 in | hidden | static attn | aggregation | MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in report["blocks"]:
        lines.append(
            f"| {b['block']} | {b['tokens_in']} → {b['tokens_out']} | {b['qkv_in']} | {b['value_per_head']} | {b['fc1_in']} | "
            f"{b['hidden']} | {'yes' if b['static_attention'] else ''} | {b['aggregated_to'] or ''} | {b['macs']:,} |"
        )
    lines += ["", "## Op inventory", "", "| op | count |", "|---|---|"]
    lines += [f"| {op} | {count} |" for op, count in report["ops"].items()]
    lines += ["", "## Gemm/MatMul constant operands", "", "| node | op | input | shape |", "|---|---|---|---|"]
    lines += [f"| {w['node']} | {w['op']} | {w['input']} | {w['shape']} |" for w in report["weight_shapes"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, onnx_path: Path) -> tuple[Path, Path]:
    json_path, md_path = report_paths(onnx_path)
    write_text_atomic(json_path, json.dumps(report, indent=1))
    write_text_atomic(md_path, markdown_report(report))
    return json_path, md_path
