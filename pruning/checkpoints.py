"""Resumable runs: the state of an expensive phase, written atomically at its boundaries.

`fit` writes `CHECKPOINTS/<phase>.pt` after every epoch (weights, optimizer, schedule, history and
every random generator it draws from); Patch Slimming writes its search result. A rerun of the
same command finds the file and continues after the last finished epoch or phase, so an
interrupted run (Ctrl-C, SIGTERM, a lost machine) loses at most the epoch in flight, and, because
the generators are restored too, ends with the same bytes as a run that was never interrupted
(same seed, machine and library versions). Each state records the settings it was made with; a
rerun with other settings is refused rather than silently mixed (`--restart` starts over).

States are plain tensors and Python values, read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vitslim.core.files import atomic_path

from .errors import PruningError

CHECKPOINT_DIR = "checkpoints"  # inside a run directory; removed once the run directory is complete


def phase_path(directory: Optional[Path], phase: str) -> Optional[Path]:
    """Where `phase`'s state goes in a checkpoint directory (None: no checkpoints)."""
    return None if directory is None else Path(directory) / f"{phase}.pt"


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, values): a phase resumes only from the start it began from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return digest.hexdigest()


def settings_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def save_state(path: Path, settings: dict, state: dict) -> None:
    """Write `state` with the `settings` it belongs to, atomically (a reader sees the old or the new file)."""
    with atomic_path(path) as tmp:
        torch.save({"settings": settings_key(settings), **state}, tmp)


def load_state(path: Optional[Path], settings: dict) -> Optional[dict]:
    """The state at `path` if there is one, checked against `settings`; None if there is none."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise PruningError(
            f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}): delete it or rerun with --restart"
        ) from None
    if not isinstance(state, dict) or state.get("settings") != settings_key(settings):
        changed = differing_settings(state.get("settings") if isinstance(state, dict) else None, settings)
        raise PruningError(
            f"checkpoint {path} was written with other settings ({changed}): rerun with the same settings to resume, "
            "or with --restart to start over"
        )
    return state


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differing_settings(recorded, settings: dict, shown: int = 4) -> str:
    """Which settings differ between a checkpoint's record (settings_key's JSON) and `settings`:
    'lr 0.001 then, 0.002 now; ...' (the first `shown` of them)."""
    try:
        before = _flat(json.loads(recorded))
    except (TypeError, ValueError, RecursionError):
        return "its record of them is unreadable"
    now = _flat(json.loads(settings_key(settings)))
    names = sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
    if not names:
        return "the same values in another form"
    parts = [f"{name} {before.get(name, 'unset')!r} then, {now.get(name, 'unset')!r} now" for name in names[:shown]]
    return "; ".join(parts) + (f"; {len(names) - shown} more" if len(names) > shown else "")


def generator_states(loader_generator: Optional[torch.Generator]) -> dict:
    """Every random generator a training epoch draws from (torch, CUDA, numpy, Python, the loader's)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        states["loader"] = loader_generator.get_state()
    return states


def restore_generators(states: dict, loader_generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if loader_generator is not None and "loader" in states:
        loader_generator.set_state(states["loader"])
