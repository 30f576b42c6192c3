"""The public Python API, re-exported by `vitslim/__init__.py`: the few functions a notebook user
calls, each a thin door onto the packages (pruning -> export -> deploy).

    model = load_model("deit_small_patch16_224", checkpoint="deit_s.pth")
    data = load_data("/data/imagenet", model)
    result = prune(model, data, "patch-slim", target_macs=0.55)
    # or on top of another method's result: prune(vtp.model, data, "patch-slim", start=vtp.plan, ...)
    export_onnx(result.model, result.plan, "slim.onnx")

Errors are VitslimError subclasses (PruningError, ExportError, DeployError), never SystemExit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from vitslim.deploy.build import DEFAULT_PROFILE, BatchProfile, BuildResult, BuildSettings, engine_from_onnx
from vitslim.deploy.gate import GateVerdict, compare_results
from vitslim.export.compact import compact_from_plan
from vitslim.export.onnx_export import ExportResult, export_plan
from vitslim.pruning.data import DataSplits
from vitslim.pruning.errors import PruningError
from vitslim.pruning.methods import get_method, list_methods
from vitslim.pruning.models import model_from_checkpoint
from vitslim.pruning.plan import ModelSpec, SlimPlan, dense_plan
from vitslim.pruning.run_dir import load_run, save_run

from .measure import compare_with_reference
from .pipeline import PruneResult, data_for, prune_model

__all__ = [
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
]


def load_model(name: str, checkpoint: Optional[str | Path] = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """A timm ViT/DeiT by name (kwargs go to timm.create_model), with `checkpoint` loaded
    (safetensors or torch.load(weights_only=True)); eval mode. Raises PruningError if vitslim
    cannot slim it."""
    return model_from_checkpoint(ModelSpec(name=name, kwargs=kwargs), checkpoint, pretrained)


def load_data(spec: str, model: nn.Module) -> DataSplits:
    """'digits' (built in) or an ImageFolder directory, resized to `model`'s input; train/val splits."""
    return data_for(model, spec)


def _dense_plan_of(model: nn.Module) -> SlimPlan:
    spec = getattr(model, "vitslim_spec", None)
    if spec is None:
        raise PruningError(
            "the model was not made by vitslim.load_model or vitslim.load_run: create it with one of them"
        )
    return dense_plan(spec, len(model.blocks))


def prune(model: nn.Module, data: DataSplits, method: str, start: Optional[SlimPlan] = None, **settings) -> PruneResult:
    """Compress `model` with a registered method (see list_methods()); `settings` are the fields of
    that method's settings dataclass. `start`: the plan `model` is under when it is another
    method's result (methods compose: `prune(vtp.model, data, "patch-slim", start=vtp.plan)`);
    default the dense plan. Returns .plan, .model (dense-shaped weights) and .report; `model`
    itself is not changed."""
    chosen = get_method(method)
    known = {field.name for field in dataclasses.fields(chosen.config_type)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PruningError(f"method {method!r} has no setting(s) {unknown}; its settings are {sorted(known)}")
    plan = _dense_plan_of(model) if start is None else start
    return prune_model(method, chosen.config_type(**settings), plan, model, data)


def compact(
    model: nn.Module, plan: SlimPlan, token_layout: str = "gather", channel_layout: str = "gather"
) -> nn.Module:
    """The physically slim module computing `plan` on `model` (which is left untouched)."""
    return compact_from_plan(model, plan, token_layout, channel_layout)


def export_onnx(model: nn.Module, plan: SlimPlan, path: str | Path, **options) -> ExportResult:
    """Slim ONNX + FILE.report.json/.md, parity-checked against the masked reference; `options`:
    images, precision ('fp32' | 'fp16'), token_layout ('gather' | 'slice'), channel_layout ('gather' |
    'masked'), tolerance, passes."""
    return export_plan(model, plan, path, **options)


def build_engine(
    onnx_path: str | Path,
    path: str | Path,
    precision: Optional[str] = None,
    profiles: Sequence[str] = (str(DEFAULT_PROFILE),),
    **options,
) -> BuildResult:
    """A TensorRT (10/11) or TensorRT-RTX engine + manifest from an exported ONNX; `profiles` are
    'MIN:OPT:MAX' batch ranges; `options` are the other BuildSettings fields."""
    settings = BuildSettings(precision=precision, profiles=tuple(BatchProfile.parse(p) for p in profiles), **options)
    return engine_from_onnx(onnx_path, path, settings)


compare = compare_with_reference


def gate(current: list[dict], baseline: list[dict], **thresholds) -> GateVerdict:
    """Compare benchmark results (from `benchmark`) with a baseline: exit_code 0 pass, 1 regression,
    2 not comparable; `thresholds`: warn, fail (fractions slower), max_cov (see deploy/gate.py)."""
    return compare_results(current, baseline, **thresholds)
