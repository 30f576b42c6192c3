"""What every compression method shares: its result type, the registry entry, the entry checks.

A method takes a model, data and a start plan and returns a plan plus the dense-shaped weights that
go with it; it never edits the caller's model. The start plan is the dense plan, or another
method's result on the other axis (methods compose): VTP narrows channels, Patch Slimming and
DGSSA + GLAD change tokens and attention, so each may start from the other kind's result, and the
plan it returns keeps what the start decided. Method modules register themselves here with
`register_method`; `vitslim.pruning.methods` imports each of them explicitly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import PruningError
from ..plan import SlimPlan, validate
from ..reference import MaskedReference
from ..timm_adapter import CHANNEL_SPACES, ViTGeometry, supported_geometry

# The two axes methods decide along: a method decides one and may start from a plan that decided
# the other (token methods read every token of every block, so one cannot start from another).
WIDTH_FIELDS = CHANNEL_SPACES
TOKEN_FIELDS = ("kept_tokens", "static_attention", "token_aggregation")


@dataclass(frozen=True)
class MethodResult:
    plan: SlimPlan
    model: nn.Module  # dense-shaped weights for the plan (a run directory's weights.safetensors)
    top1: float  # final validation top-1 (%) of the plan on these weights
    report: dict = field(default_factory=dict)  # method-specific: accuracy per stage, kept sets, ...


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # as messages and reports name it
    config_type: type  # a frozen dataclass whose __post_init__ validates the settings
    decides: tuple[str, ...]  # its axis (WIDTH_FIELDS or TOKEN_FIELDS): a start plan leaves it dense
    # run(model, data, config, base, checkpoints=None) -> MethodResult
    #   model: the timm model (never edited); data: DataSplits; config: an instance of config_type;
    #   base: the start plan (the dense plan, or another method's result; see `start`);
    #   checkpoints: a directory where the method writes each fine-tuning phase's checkpoint
    #   (pruning.checkpoints.phase_path) and resumes an interrupted run from (None: none).
    run: Callable[..., MethodResult]


METHODS: dict[str, Method] = {}


def register_method(name: str, title: str, config_type: type, decides: tuple[str, ...]) -> Callable:
    def register(run: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name=name, title=title, config_type=config_type, decides=decides, run=run)
        return run

    return register


def start(model: nn.Module, base: SlimPlan, method: str) -> tuple[ViTGeometry, MaskedReference]:
    """Common entry checks of the methods: a supported model and a start plan that leaves the
    axis `method` decides dense. Returns the geometry and the start model, `model` under `base`
    (frozen, a copy): the accuracy the method starts from and the teacher it distils from."""
    geometry = supported_geometry(model)
    validate(base, geometry)
    entry = METHODS[method]
    for index, block in enumerate(base.blocks):
        decided = [name for name in entry.decides if getattr(block, name) is not None]
        if decided:
            other = "VTP's" if entry.decides == TOKEN_FIELDS else "Patch Slimming's or DGSSA + GLAD's"
            raise PruningError(
                f"{entry.title} cannot start from a plan that already sets {decided[0]} (block {index}, "
                f"method {base.method}): start it from the dense run or from {other} run"
            )
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return geometry, MaskedReference(teacher, base).eval()  # a new module starts in training mode


def composed_name(base: SlimPlan, method: str) -> str:
    """The method a plan is recorded as: `method`, after the start plan's when it was not dense."""
    return method if base.is_dense else f"{base.method}+{method}"
