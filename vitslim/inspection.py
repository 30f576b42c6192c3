"""`vitslim inspect ARTIFACT`: what an ONNX file, an engine or a run directory is, in one screen:
inputs and outputs, precision, preprocessing, batch profiles, build options, and for an engine on
a GPU the per-layer information of TensorRT's engine inspector."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from vitslim.core.files import sha256_of
from vitslim.deploy.errors import DeployError

# Layer names/types TensorRT gives fused attention (fMHA / flash kernels; Myelin names the fused
# region after the ops it swallowed). A heuristic: TensorRT documents no flag for it.
ATTENTION_MARKERS = ("mha", "attention", "flash")


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def describe_onnx(path: Path) -> dict:
    import onnx

    from vitslim.core.metadata import attention_form_of, preprocessing_of
    from vitslim.core.precision import graph_precision
    from vitslim.deploy.build import read_onnx

    model = read_onnx(path)
    io = {
        kind: [
            {"name": v.name, "shape": _dims(v), "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}
            for v in values
        ]
        for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output))
    }
    description = {
        "kind": "onnx",
        "file": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "producer": model.producer_name,
        "precision": graph_precision(model),
        "attention_form": attention_form_of(model),
        **io,
        "preprocessing": preprocessing_of(model),
        "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
    }
    from vitslim.export.report import report_paths

    report = report_paths(path)[0]
    if report.is_file():
        data = json.loads(report.read_text())
        if data.get("onnx", {}).get("sha256") == description["sha256"]:
            description["export_report"] = {
                k: data.get(k)
                for k in ("method", "macs", "macs_dense", "params", "params_dense", "token_layout", "passes", "parity")
            }
    return description


def describe_engine(path: Path, layers: bool = True) -> dict:
    from vitslim.deploy.gpu import gpu_info
    from vitslim.deploy.manifest import check_engine
    from vitslim.deploy.runners import TensorRTRunner

    manifest = check_engine(path)
    description = {
        "kind": "engine",
        "file": str(path),
        **{
            k: manifest[k]
            for k in (
                "library",
                "version",
                "precision",
                "tolerance",
                "profiles",
                "input",
                "target",
                "build_options",
                "network",
                "preprocessing",
                "timing_cache",
                "onnx",
                "engine",
            )
        },
    }
    if not layers:
        return description
    if gpu_info() is None:
        description["layers"] = "per-layer information needs the GPU that runs the engine: run 'vitslim inspect' there"
        return description
    with TensorRTRunner(path) as runner:
        information = runner.layer_information()
    names = [str(layer.get("Name", layer)) if isinstance(layer, dict) else str(layer) for layer in information]
    kinds = Counter(str(layer.get("LayerType", "?")) if isinstance(layer, dict) else "?" for layer in information)
    fused = [n for n in names if any(marker in n.lower() for marker in ATTENTION_MARKERS)]
    description["layers"] = {
        "count": len(information),
        "types": dict(kinds),
        "attention_fused_layers": fused,
        "attention_fused": bool(fused),
        "names": names,
    }
    return description


def describe_run(path: Path) -> dict:
    from vitslim.pruning.macs import macs_fraction, plan_macs
    from vitslim.pruning.run_dir import load_run
    from vitslim.pruning.timm_adapter import geometry_of

    plan, model = load_run(path)
    geometry = geometry_of(model)
    blocks = [
        {
            field: (
                None
                if getattr(b, field) is None
                else len(getattr(b, field))
                if field not in ("static_attention", "token_aggregation")
                else list(getattr(b, field).shape)
            )
            for field in (
                "kept_tokens",
                "qkv_in",
                "proj_in",
                "fc1_in",
                "hidden",
                "static_attention",
                "token_aggregation",
            )
        }
        for b in plan.blocks
    ]
    return {
        "kind": "run directory",
        "dir": str(path),
        "method": plan.method,
        "model": plan.model.to_dict(),
        "macs": plan_macs(plan, geometry)["total"],
        "macs_fraction": macs_fraction(plan, geometry),
        "blocks": blocks,
    }


def describe(path: str | Path, layers: bool = True) -> dict:
    path = Path(path)
    if path.is_dir():
        return describe_run(path)
    if not path.exists():
        raise DeployError(f"{path} does not exist: give an .onnx, an .engine or a run directory")
    from vitslim.deploy.build import ENGINE_SUFFIXES

    if path.suffix in ENGINE_SUFFIXES:
        return describe_engine(path, layers)
    return describe_onnx(path)


def to_text(description: dict) -> str:
    """The description as indented 'key: value' lines (lists of names shortened)."""
    lines = []

    def walk(value, indent: int, key: str) -> None:
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for inner_key, inner in value.items():
                walk(inner, indent + 1, inner_key)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for item in value:
                lines.append(f"{pad}  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        elif isinstance(value, list) and len(value) > 12:
            lines.append(f"{pad}{key}: {value[:12]} ... ({len(value)} in all)")
        else:
            lines.append(f"{pad}{key}: {value}")

    for key, value in description.items():
        walk(value, 0, key)
    return "\n".join(lines)
