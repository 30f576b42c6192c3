"""A run directory: plan.json + plan.safetensors (the slim architecture as data) and
weights.safetensors (a plain state dict of the dense-shaped model). Never a pickled module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

from vitslim.core.files import write_text_atomic

from .errors import PruningError
from .models import WEIGHTS_FILE, create_model, load_weights, read_checkpoint, save_weights
from .plan import PLAN_JSON, SlimPlan, load_plan, save_plan, validate


def save_run(directory: str | Path, plan: SlimPlan, model: nn.Module, info: Optional[dict] = None) -> Path:
    """Write the plan, the weights and (optionally) info.json into `directory`."""
    directory = Path(directory)
    validate(plan, model)
    save_weights(model, directory / WEIGHTS_FILE)
    if info is not None:
        write_text_atomic(directory / "info.json", json.dumps(info, indent=1))
    save_plan(plan, directory)  # last: a directory with plan.json is complete
    return directory


def load_run(directory: str | Path) -> tuple[SlimPlan, nn.Module]:
    """Rebuild (plan, model with the run's weights) from a run directory."""
    directory = Path(directory)
    if not (directory / PLAN_JSON).is_file():
        raise PruningError(
            f"{directory} is not a run directory (no {PLAN_JSON}): run 'vitslim train' or 'vitslim prune' first"
        )
    plan = load_plan(directory)
    model = create_model(plan.model)
    load_weights(model, read_checkpoint(directory / WEIGHTS_FILE), source=f"run weights {directory / WEIGHTS_FILE}")
    validate(plan, model)
    return plan, model
