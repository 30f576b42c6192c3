"""SlimPlan: the slim architecture as data, what pruning/ writes and export/ builds from.

Every decision a method makes travels in the plan and nowhere else. export/ also uses pruning's
masked reference (what parity is checked against), its MAC counting and its timm adapter (the
model's geometry), which describe the model and never a method's choices.

A plan says, per block, what survives: which tokens the block outputs, which channels each
prunable linear reads, whether attention is a constant matrix, and whether the patch tokens are
first aggregated by a linear map on the token axis. It is plain data: JSON for structure,
safetensors for tensors, with a schema version.

Per block, in the order the block applies them (N_in tokens arrive, P of them prefix tokens):

1. ``token_aggregation`` [M, N_in - P]: patch tokens become ``T @ patches``; now N_in = P + M.
2. ``kept_tokens``: indices into those N_in tokens that the block outputs (N_out of them,
   strictly increasing, the P prefix tokens first). Queries only for them; keys/values from all.
3. ``qkv_in``: kept LayerNorm-1 channels (indices into dim) read by q, k and v.
4. ``static_attention`` [H, N_out, N_in]: replaces softmax(q kᵀ); q and k are then not computed.
5. ``proj_in``: kept value channels (indices into heads*head_dim, head-major), the same count
   in every head; the rest of v and the matching proj columns are removed.
6. ``fc1_in``: kept LayerNorm-2 channels read by fc1; ``hidden``: kept MLP hidden units.

``None`` means "keep everything" for every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from vitslim.core.files import atomic_path, read_json

from .errors import PruningError
from .timm_adapter import CHANNEL_SPACES, ViTGeometry, supported_geometry

SCHEMA_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"
INDEX_FIELDS = ("kept_tokens", "qkv_in", "proj_in", "fc1_in", "hidden")
TENSOR_FIELDS = ("static_attention", "token_aggregation")

Indices = Optional[tuple[int, ...]]


@dataclass(frozen=True)
class ModelSpec:
    """A timm model by name plus the keyword arguments it is created with (JSON-able)."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """What one block keeps; every field None keeps the dense block."""

    kept_tokens: Indices = None
    qkv_in: Indices = None
    proj_in: Indices = None
    fc1_in: Indices = None
    hidden: Indices = None
    static_attention: Optional[torch.Tensor] = None
    token_aggregation: Optional[torch.Tensor] = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockPlan):
            return NotImplemented
        if any(getattr(self, name) != getattr(other, name) for name in INDEX_FIELDS):
            return False
        return all(_tensors_equal(getattr(self, name), getattr(other, name)) for name in TENSOR_FIELDS)

    @property
    def is_dense(self) -> bool:
        return all(getattr(self, name) is None for name in INDEX_FIELDS + TENSOR_FIELDS)


@dataclass(frozen=True)
class SlimPlan:
    """A model spec, one BlockPlan per block, and the method that wrote it."""

    model: ModelSpec
    blocks: tuple[BlockPlan, ...]
    method: str = "dense"

    @property
    def is_dense(self) -> bool:
        """Every block keeps everything (the dense plan, whatever method name it carries)."""
        return all(block.is_dense for block in self.blocks)

    def with_block(self, index: int, block: BlockPlan) -> "SlimPlan":
        """Return a new plan with block `index` replaced (plans are never edited in place)."""
        blocks = list(self.blocks)
        blocks[index] = block
        return replace(self, blocks=tuple(blocks))


def _tensors_equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


def dense_plan(spec: ModelSpec, depth: int) -> SlimPlan:
    """The plan that keeps everything: the dense model."""
    return SlimPlan(model=spec, blocks=tuple(BlockPlan() for _ in range(depth)))


def as_indices(values: Optional[Sequence[int] | torch.Tensor]) -> Indices:
    """Normalise a list, tuple or tensor of indices to the plan's tuple-of-int form."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return tuple(int(v) for v in values)


# ----------------------------------------------------------------------------------- validation


def _check_indices(where: str, values: Indices, size: int) -> None:
    if values is None:
        return
    if len(values) == 0:
        raise PruningError(f"{where}: keeps nothing; keep at least one index or use null for all")
    for v in values:
        if not 0 <= v < size:
            raise PruningError(f"{where}: index {v} out of range [0, {size})")
    if len(set(values)) != len(values):
        duplicate = next(v for v in values if values.count(v) > 1)
        raise PruningError(f"{where}: duplicate index {duplicate}")
    if list(values) != sorted(values):
        raise PruningError(f"{where}: indices must be in increasing order")


def _check_tensor(where: str, tensor: Optional[torch.Tensor], shape: tuple[int, ...]) -> None:
    if tensor is None:
        return
    if tuple(tensor.shape) != shape:
        raise PruningError(f"{where}: shape {tuple(tensor.shape)} does not match expected {shape}")
    if not torch.isfinite(tensor).all():
        raise PruningError(f"{where}: contains NaN or infinite values")


def _check_value_heads(where: str, proj_in: Indices, geometry: ViTGeometry) -> None:
    if proj_in is None:
        return
    per_head = [0] * geometry.num_heads
    for channel in proj_in:
        per_head[channel // geometry.head_dim] += 1
    if len(set(per_head)) != 1:
        raise PruningError(
            f"{where}: heads keep {per_head} value channels; the compact layout needs the same "
            "count in every head (round the kept set per head)"
        )


@dataclass(frozen=True)
class TokenCounts:
    """The token counts of one block: arriving, read after aggregation (keys/values), written."""

    arriving: int
    read: int
    written: int


def token_counts(plan: SlimPlan, geometry: ViTGeometry) -> list[TokenCounts]:
    """The one walk of the token axis through the blocks. Counts follow the plan's fields as
    given (an aggregation of M rows makes P + M tokens); validate() checks that they fit."""
    counts, arriving = [], geometry.num_tokens
    for block in plan.blocks:
        aggregation = block.token_aggregation
        read = (
            arriving
            if aggregation is None
            else geometry.num_prefix_tokens + (aggregation.shape[0] if aggregation.dim() else 0)
        )
        written = read if block.kept_tokens is None else len(block.kept_tokens)
        counts.append(TokenCounts(arriving, read, written))
        arriving = written
    return counts


def _validate_block(index: int, block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts) -> None:
    """Check one block against the tokens it receives (earlier blocks are valid)."""
    prefix, sizes = geometry.num_prefix_tokens, geometry.channel_sizes
    where = f"block {index} field"
    if block.token_aggregation is not None:
        aggregation = block.token_aggregation
        if aggregation.dim() != 2 or aggregation.shape[1] != counts.arriving - prefix or aggregation.shape[0] < 1:
            raise PruningError(
                f"{where} token_aggregation: shape {tuple(aggregation.shape)} must be [M >= 1, {counts.arriving - prefix}] "
                f"(the block receives {counts.arriving - prefix} non-prefix tokens)"
            )
        _check_tensor(f"{where} token_aggregation", aggregation, tuple(aggregation.shape))
    _check_indices(f"{where} kept_tokens", block.kept_tokens, counts.read)
    if block.kept_tokens is not None and tuple(block.kept_tokens[:prefix]) != tuple(range(prefix)):
        raise PruningError(
            f"{where} kept_tokens: prefix tokens 0..{prefix - 1} (class/distillation/register) must be kept"
        )
    for space in CHANNEL_SPACES:
        _check_indices(f"{where} {space}", getattr(block, space), sizes[space])
    _check_value_heads(f"{where} proj_in", block.proj_in, geometry)
    _check_tensor(
        f"{where} static_attention", block.static_attention, (geometry.num_heads, counts.written, counts.read)
    )


def validate(plan: SlimPlan, model: "ViTGeometry | torch.nn.Module") -> None:
    """Raise PruningError naming the block and field of the first problem in `plan`.

    `model` is a timm ViT (checked for support first) or its ViTGeometry.
    """
    geometry = model if isinstance(model, ViTGeometry) else supported_geometry(model)
    if len(plan.blocks) != geometry.depth:
        raise PruningError(f"plan has {len(plan.blocks)} blocks but the model has {geometry.depth}")
    counts = token_counts(plan, geometry)
    for index, block in enumerate(plan.blocks):
        _validate_block(index, block, geometry, counts[index])
    if geometry.pools_patch_tokens and counts[-1].written <= geometry.num_prefix_tokens:
        raise PruningError("the last block keeps no patch token, but the model's head averages patch tokens")


# ----------------------------------------------------------------------------------- persistence


def plan_to_json(plan: SlimPlan) -> dict:
    blocks = []
    for block in plan.blocks:
        entry = {
            name: (list(getattr(block, name)) if getattr(block, name) is not None else None) for name in INDEX_FIELDS
        }
        entry.update({name: getattr(block, name) is not None for name in TENSOR_FIELDS})
        blocks.append(entry)
    return {"schema_version": SCHEMA_VERSION, "method": plan.method, "model": plan.model.to_dict(), "blocks": blocks}


def plan_digest(plan: SlimPlan) -> str:
    """sha256 of a plan (its JSON and its tensors): what an export report records of the plan it
    was made from."""
    import hashlib

    digest = hashlib.sha256(json.dumps(plan_to_json(plan), sort_keys=True).encode())
    for i, block in enumerate(plan.blocks):
        for name in TENSOR_FIELDS:
            tensor = getattr(block, name)
            if tensor is not None:
                digest.update(f"{i}.{name}".encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_plan(plan: SlimPlan, directory: str | Path) -> Path:
    """Write plan.json and plan.safetensors into `directory` (atomically each)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {
        f"blocks.{i}.{name}": getattr(block, name).detach().to("cpu", torch.float32).contiguous()
        for i, block in enumerate(plan.blocks)
        for name in TENSOR_FIELDS
        if getattr(block, name) is not None
    }
    with atomic_path(directory / PLAN_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"schema_version": str(SCHEMA_VERSION)})
    with atomic_path(directory / PLAN_JSON) as tmp:
        tmp.write_text(json.dumps(plan_to_json(plan), indent=1))
    return directory / PLAN_JSON


def _json_indices(values, where: str) -> Indices:
    """Indices as plan.json holds them: null or a list of integers (a float, even 1.0, or a
    boolean is refused rather than truncated; ranges are checked by validate())."""
    if values is None:
        return None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PruningError(f"plan JSON {where}: indices must be a list of integers: re-create the plan")
    return tuple(values)


def plan_from_json(data: dict, tensors: Mapping[str, torch.Tensor]) -> SlimPlan:
    if not isinstance(data, dict):
        raise PruningError(f"plan JSON is malformed (a {type(data).__name__}, not a mapping): re-create the plan")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PruningError(
            f"plan schema version {version!r} is not {SCHEMA_VERSION}: re-create the plan with this vitslim"
        )
    model, blocks_json, method = data.get("model"), data.get("blocks"), data.get("method", "dense")
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("name"), str)
        or not isinstance(model.get("kwargs", {}), dict)
        or not isinstance(blocks_json, list)
        or not all(isinstance(entry, dict) for entry in blocks_json)
        or not isinstance(method, str)
    ):
        raise PruningError(
            "plan JSON is malformed (model: {name, kwargs}, blocks: a list of mappings, method: text): re-create the plan"
        )
    try:
        blocks = []
        for i, entry in enumerate(blocks_json):
            fields = {name: _json_indices(entry.get(name), f"block {i} {name}") for name in INDEX_FIELDS}
            for name in TENSOR_FIELDS:
                if entry.get(name):
                    key = f"blocks.{i}.{name}"
                    if key not in tensors:
                        raise PruningError(f"plan tensor {key} is missing from {PLAN_TENSORS}")
                    fields[name] = tensors[key]
            blocks.append(BlockPlan(**fields))
        spec = ModelSpec(name=data["model"]["name"], kwargs=dict(data["model"].get("kwargs", {})))
        return SlimPlan(model=spec, blocks=tuple(blocks), method=data.get("method", "dense"))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        if isinstance(error, PruningError):
            raise
        raise PruningError(f"plan JSON is malformed ({type(error).__name__}): re-create the plan") from None


def load_plan(directory: str | Path) -> SlimPlan:
    """Read a plan written by save_plan (structure is checked here, sizes by validate())."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    data = read_json(
        directory / PLAN_JSON,
        "plan",
        "pass a run directory written by 'vitslim train' or 'vitslim prune' (or re-create this one)",
        PruningError,
    )
    tensor_path = directory / PLAN_TENSORS
    try:
        tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    except (SafetensorError, OSError) as error:
        raise PruningError(
            f"plan tensors {tensor_path} are unreadable ({error}): re-create the run directory"
        ) from None
    return plan_from_json(data, tensors)
