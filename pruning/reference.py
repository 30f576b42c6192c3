"""The masked reference: a plan's meaning on the dense timm model.

It runs timm's own forward on full-size weights and changes only what the plan changes, through
hooks: channel masks on the inputs of qkv, proj, fc1 and fc2, a token-aggregation map before a
block, a row selection after it, and a constant matrix in place of the attention probabilities.
It is simple on purpose so that it is obviously right; every compact or exported artifact is
held to it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .plan import BlockPlan, SlimPlan, validate
from .timm_adapter import CHANNEL_SPACES, block_parts, blocks_of, set_fused_attention, supported_geometry


def channel_mask(kept: tuple[int, ...], size: int, like: torch.Tensor) -> torch.Tensor:
    """A [size] 0/1 mask with ones at `kept`, in `like`'s dtype and device."""
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[list(kept)] = 1
    return mask


def aggregate_tokens(x: torch.Tensor, aggregation: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, P + N, C] with aggregation [M, N] -> [B, P + M, C]; the P prefix tokens pass unchanged."""
    patches = torch.matmul(aggregation.to(x.dtype), x[:, num_prefix:])
    return torch.cat([x[:, :num_prefix], patches], dim=1)


def _scale_input_hook(scale: torch.Tensor):
    """Multiply a Linear's input channel-wise by `scale` [C] (a 0/1 mask or learnable gates)."""

    def hook(module: nn.Module, args: tuple):
        return (args[0] * scale.to(args[0].dtype),) + args[1:]

    return hook


def _aggregate_hook(aggregation: torch.Tensor, num_prefix: int):
    def hook(module: nn.Module, args: tuple):
        return (aggregate_tokens(args[0], aggregation.to(args[0].device), num_prefix),) + args[1:]

    return hook


def _select_rows_hook(kept: tuple[int, ...]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[:, list(kept)]

    return hook


def _static_attention_hook(static: torch.Tensor, kept: Optional[tuple[int, ...]]):
    def hook(module: nn.Module, args: tuple, probs: torch.Tensor) -> torch.Tensor:
        # probs: [B, H, N_in, N_in]; only the kept query rows survive the block, so only they
        # need the static values.
        constant = static.to(device=probs.device, dtype=probs.dtype)
        if kept is None:
            return constant.expand_as(probs)
        replaced = probs.clone()
        replaced[:, :, list(kept)] = constant
        return replaced

    return hook


def _block_hooks(block: nn.Module, plan: BlockPlan, num_prefix: int) -> list:
    parts = block_parts(block)
    handles = []
    if plan.token_aggregation is not None:
        handles.append(block.register_forward_pre_hook(_aggregate_hook(plan.token_aggregation, num_prefix)))
    if plan.kept_tokens is not None:
        handles.append(block.register_forward_hook(_select_rows_hook(plan.kept_tokens)))
    for space in CHANNEL_SPACES:
        kept = getattr(plan, space)
        if kept is not None:
            linear = parts.reader_of(space)
            mask = channel_mask(kept, linear.in_features, linear.weight)
            handles.append(linear.register_forward_pre_hook(_scale_input_hook(mask)))
    if plan.static_attention is not None:
        handles.append(
            parts.attn_probs.register_forward_hook(_static_attention_hook(plan.static_attention, plan.kept_tokens))
        )
    return handles


def _undo(handles: list, fused: dict[int, bool], blocks: Sequence[nn.Module]) -> None:
    """Remove hooks and restore each block's fused-attention setting."""
    for handle in handles:
        handle.remove()
    for index, enabled in fused.items():
        set_fused_attention(blocks[index], enabled)


@contextlib.contextmanager
def blocks_applied(blocks: Sequence[nn.Module], block_plans: Sequence[BlockPlan], num_prefix: int) -> Iterator[None]:
    """Within the context, each block computes its BlockPlan (no validation: callers validate)."""
    handles, fused = [], {}
    try:
        for index, (block, block_plan) in enumerate(zip(blocks, block_plans)):
            if block_plan.static_attention is not None:
                fused[index] = set_fused_attention(block, False)
            handles += _block_hooks(block, block_plan, num_prefix)
        yield
    finally:
        _undo(handles, fused, blocks)


@contextlib.contextmanager
def plan_applied(model: nn.Module, plan: SlimPlan, check: bool = True) -> Iterator[nn.Module]:
    """Within the context, `model`'s forward computes the plan's semantics; afterwards it is dense again.

    `check=False` skips validation for callers that validated the same plan already.
    """
    geometry = supported_geometry(model)
    if check:
        validate(plan, geometry)
    with blocks_applied(list(blocks_of(model)), plan.blocks, geometry.num_prefix_tokens):
        yield model


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record, per block, its input tokens ("input" [B, N_in, C], after any aggregation) and its
    post-softmax attention ("attention" [B, H, N_in, N_in], all query rows) on each forward.

    Enter it after plan_applied so that the inputs seen are the plan's. Uses timm's unfused path.
    """
    records: dict[int, dict[str, torch.Tensor]] = {}
    blocks = list(blocks_of(model))
    handles, fused = [], {}

    def keep_input(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            records.setdefault(index, {})["input"] = args[0]

        return hook

    def keep_attention(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            records.setdefault(index, {})["attention"] = output

        return hook

    try:
        for index, block in enumerate(blocks):
            fused[index] = set_fused_attention(block, False)
            handles.append(block_parts(block).norm1.register_forward_pre_hook(keep_input(index)))
            handles.append(block_parts(block).attn_probs.register_forward_hook(keep_attention(index)))
        yield records
    finally:
        _undo(handles, fused, blocks)


@contextlib.contextmanager
def scaled_channels(model: nn.Module, scales: Mapping[tuple[int, str], torch.Tensor]) -> Iterator[nn.Module]:
    """Within the context, channel space `space` of block `b` is multiplied by scales[(b, space)].

    Spaces are CHANNEL_SPACES; a scale is a [C] tensor (e.g. learnable gates, which stay in the
    autograd graph).
    """
    blocks = blocks_of(model)
    handles = [
        block_parts(blocks[index]).reader_of(space).register_forward_pre_hook(_scale_input_hook(scale))
        for (index, space), scale in scales.items()
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class MaskedReference(nn.Module):
    """`model` under `plan`, as a module: trainable (the masks and constants are fixed) and callable."""

    def __init__(self, model: nn.Module, plan: SlimPlan) -> None:
        super().__init__()
        validate(plan, model)
        self.model = model
        self.plan = plan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with plan_applied(self.model, self.plan, check=False):
            return self.model(images)
