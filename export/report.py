"""The export report (FILE.report.json + FILE.report.md beside FILE.onnx): the one writer and
reader of the format. Params, MACs, op inventory, weight shapes and parity, as JSON for CI scripts
and Markdown for people.

The JSON holds report_version and at least macs_dense, macs, params, params_dense, ops, parity
and onnx (file, bytes, sha256). It describes the ONNX bytes whose digest it records: a reader
takes it for an ONNX file only when the digests agree (an INT8 file's FILE.report.json is the
quantization report, which records no digest, and is not an export report).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import onnx
from onnx import numpy_helper

from vitslim.core.files import read_json, write_text_atomic
from vitslim.core.metadata import tensor_dims

from .errors import ExportError

REPORT_VERSION = 1  # reports written before the version was recorded hold the same fields
REPORT_COUNTS = ("macs", "macs_dense", "params", "params_dense")  # positive integers


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
    return {v.name: tensor_dims(v) for v in list(model.graph.input) + list(model.graph.output)}


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


def read_report(onnx_path: Path, onnx_sha256: str) -> Optional[dict]:
    """The export report of the ONNX file at `onnx_path`, whose bytes hash to `onnx_sha256`; None
    when there is none or FILE.report.json describes other bytes (another export, or the
    quantization report of an INT8 file). One line of ExportError for a report that cannot be read,
    is of another version, or whose counts are not positive integers (MACs at most the dense MACs)."""
    path = report_paths(Path(onnx_path))[0]
    if not path.is_file():
        return None
    fix = f"export {Path(onnx_path).name} again ('vitslim export'), which rewrites its report"
    report = read_json(path, "export report", fix, ExportError)
    recorded = report.get("onnx") if isinstance(report, dict) else None
    if not isinstance(recorded, dict) or recorded.get("sha256") != onnx_sha256:
        return None
    if report.get("report_version", REPORT_VERSION) != REPORT_VERSION:
        raise ExportError(f"export report {path.resolve()} is of another version than {REPORT_VERSION}: {fix}")
    counts = [report.get(key) for key in REPORT_COUNTS]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts) or counts[0] > counts[1]:
        raise ExportError(
            f"export report {path.resolve()} holds {', '.join(REPORT_COUNTS)} that are not positive integers "
            f"(MACs at most the dense MACs): {fix}"
        )
    if not isinstance(report.get("method"), str):
        raise ExportError(f"export report {path.resolve()} names no method: {fix}")
    return report


def macs_fraction_of(report: Optional[dict]) -> Optional[float]:
    """The report's MACs over the dense model's (None without a report)."""
    return None if report is None else report["macs"] / report["macs_dense"]
