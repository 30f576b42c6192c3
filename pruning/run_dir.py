"""The run directory: the one writer and reader of the format.

plan.json + plan.safetensors (the slim architecture as data; plan.json's schema_version is the
format's version), weights.safetensors (a plain state dict of the dense-shaped model, never a
pickled module), info.json (what made it: model, data, settings, history) and what the stage adds
for people (reports, plots).

plan.json is the completion marker, written last: `begin_run` removes it before anything is
rewritten, so that a run interrupted while rewriting a directory leaves no run directory (readers
refuse it) rather than new weights beside an old plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

from vitslim.core.files import read_json, write_text_atomic

from .errors import PruningError
from .models import WEIGHTS_FILE, create_model, load_weights, read_checkpoint, save_weights
from .plan import PLAN_JSON, PLAN_TENSORS, SlimPlan, load_plan, save_plan, validate

INFO_JSON = "info.json"


def begin_run(directory: str | Path) -> Path:
    """Make `directory` no run directory until `save_run` completes it (its plan, the completion
    marker, goes first); call before writing anything else into it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (PLAN_JSON, PLAN_TENSORS):
        (directory / name).unlink(missing_ok=True)
    return directory


def save_run(directory: str | Path, plan: SlimPlan, model: nn.Module, info: Optional[dict] = None) -> Path:
    """Write the weights, info.json (when given) and, last, the plan into `directory`."""
    directory = Path(directory)
    validate(plan, model)
    begin_run(directory)
    save_weights(model, directory / WEIGHTS_FILE)
    if info is not None:
        write_text_atomic(directory / INFO_JSON, json.dumps(info, indent=1))
    save_plan(plan, directory)  # last: a directory with plan.json is complete
    return directory


def read_info(directory: str | Path) -> dict:
    """info.json of a run directory ({} for a run that wrote none), checked: a JSON object whose
    `data`, when present, is the text of a data source."""
    path = Path(directory) / INFO_JSON
    if not path.exists():
        return {}
    fix = "re-create the run directory with 'vitslim train' or 'vitslim prune'"
    info = read_json(path, "run info", fix, PruningError)
    if not isinstance(info, dict) or not isinstance(info.get("data", ""), str):
        raise PruningError(f"run info {path.resolve()} is not what vitslim writes (an object; data as text): {fix}")
    identity = info.get("data_identity")
    if identity is not None and not (
        isinstance(identity, dict)
        and isinstance(identity.get("classes"), list)
        and all(isinstance(c, str) for c in identity["classes"])
        and isinstance(identity.get("files"), str)
        and isinstance(identity.get("source"), str)
        and isinstance(identity.get("images"), int)
    ):
        raise PruningError(f"run info {path.resolve()} holds a data_identity that is not what vitslim writes: {fix}")
    return info


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
