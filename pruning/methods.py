"""Compression methods, registered by name. A method takes a dense model and data and returns a
plan plus the dense-shaped weights that go with it; it never edits the caller's model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .plan import SlimPlan


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
    run: Callable[..., MethodResult]  # run(model, data, config, teacher=None) -> MethodResult


METHODS: dict[str, Method] = {}


def register_method(name: str, config_type: type) -> Callable:
    def register(run: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name=name, config_type=config_type, run=run)
        return run

    return register


def get_method(name: str) -> Method:
    from .errors import PruningError
    from . import dgssa_glad, patch_slimming, vtp  # noqa: F401  (importing a method module registers it)

    if name not in METHODS:
        raise PruningError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name]
