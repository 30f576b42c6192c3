"""vitslim: compress timm Vision Transformers and ship them as slim ONNX graphs and TensorRT engines.

The public API (README "Python API", docs/api.md). Names are imported on first use, so `import vitslim` and
`import vitslim.deploy` stay light (no torch, timm or onnx until a function needs them).
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_PUBLIC = {
    **{
        name: "vitslim.api"
        for name in (
            "load_model",
            "load_data",
            "list_methods",
            "prune",
            "PruneResult",
            "save_run",
            "load_run",
            "compact",
            "export_onnx",
            "build_engine",
            "compare",
            "gate",
        )
    },
    "benchmark": "vitslim.deploy.bench",
    "BenchSettings": "vitslim.deploy.bench",
    "paired_ab": "vitslim.deploy.gate",
    "ABSettings": "vitslim.deploy.gate",
    "TorchRunner": "vitslim.deploy.runners",
    "OnnxRuntimeRunner": "vitslim.deploy.runners",
    "TensorRTRunner": "vitslim.deploy.runners",
    "TableSpec": "vitslim.latency_table",
    "measure_table": "vitslim.latency_table",
    "read_latency_table": "vitslim.pruning.latency",
    "LatencyTable": "vitslim.pruning.latency",
    "SlimPlan": "vitslim.pruning.plan",
    "BlockPlan": "vitslim.pruning.plan",
    "VitslimError": "vitslim.core.errors",
    "PruningError": "vitslim.pruning.errors",
    "ExportError": "vitslim.export.errors",
    "DeployError": "vitslim.deploy.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vitslim' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
