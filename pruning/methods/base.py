"""What every compression method shares: its result type, the registry entry, the entry checks.

A method takes a dense model and data and returns a plan plus the dense-shaped weights that go
with it; it never edits the caller's model. Method modules register themselves here with
`register_method`; `vitslim.pruning.methods` imports each of them explicitly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from ..errors import PruningError
from ..plan import SlimPlan
from ..timm_adapter import ViTGeometry, supported_geometry


@dataclass(frozen=True)
class MethodResult:
    plan: SlimPlan
    model: nn.Module  # dense-shaped weights for the plan (a run directory's weights.safetensors)
    top1: float  # final validation top-1 (%) of the plan on these weights
    report: dict = field(default_factory=dict)  # method-specific: accuracy per stage, kept sets, ...


@dataclass(frozen=True)
class Method:
    name: str
    config_type: type  # a frozen dataclass whose __post_init__ validates the settings
    # run(model, data, config, base, teacher=None, checkpoints=None) -> MethodResult
    #   model: the dense timm model (never edited); data: DataSplits; config: an instance of
    #   config_type; base: the model's dense plan; teacher: the distillation teacher (None: a frozen
    #   copy of model); checkpoints: a directory where the method writes each fine-tuning phase's
    #   checkpoint (pruning.checkpoints.phase_path) and resumes an interrupted run from (None: none).
    run: Callable[..., MethodResult]


METHODS: dict[str, Method] = {}


def register_method(name: str, config_type: type) -> Callable:
    def register(run: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name=name, config_type=config_type, run=run)
        return run

    return register


def dense_start(
    model: nn.Module, base: SlimPlan, teacher: Optional[nn.Module], method: str
) -> tuple[ViTGeometry, nn.Module]:
    """Common entry checks of the methods: a supported model with a dense plan. Returns its
    geometry and the teacher for distillation (a frozen copy of `model` unless one is given)."""
    geometry = supported_geometry(model)
    if any(not block.is_dense for block in base.blocks):
        raise PruningError(f"{method} starts from a dense model: give a dense run directory or checkpoint")
    return geometry, teacher if teacher is not None else copy.deepcopy(model).eval()
