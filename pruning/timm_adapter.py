"""The one module that knows timm's attribute names (`blocks[i].attn.qkv`, `mlp.fc1`, ...).

Everything else in vitslim asks this module for a model's geometry or a block's parts, so a
change in timm is mended here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import PruningError

# Pool types that average or max over the patch tokens: they need at least one patch token left.
_PATCH_POOLS = ("avg", "max", "avgmax")
_SUPPORTED_POOLS = ("token", "", *_PATCH_POOLS)


@dataclass(frozen=True)
class ViTGeometry:
    """The sizes of a timm VisionTransformer that plans, MACs and exports are expressed in."""

    depth: int
    dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_prefix_tokens: int
    num_patches: int
    patch_embed_macs: int
    head_macs: int
    pools_patch_tokens: bool

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def channel_sizes(self) -> dict[str, int]:
        """Full size of each prunable channel space (CHANNEL_SPACES), by name."""
        return {"qkv_in": self.dim, "proj_in": self.attn_dim, "fc1_in": self.dim, "hidden": self.mlp_hidden}


@dataclass(frozen=True)
class BlockParts:
    """References to the timm submodules of one transformer block (not copies)."""

    norm1: nn.Module
    attn: nn.Module
    qkv: nn.Linear
    q_norm: nn.Module
    k_norm: nn.Module
    attn_probs: nn.Module  # applied to the post-softmax attention in timm's unfused path
    proj: nn.Linear
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    fc1: nn.Linear
    fc2: nn.Linear
    ls2: nn.Module

    def reader_of(self, space: str) -> nn.Linear:
        """The Linear whose input is the channel space `space` (one of CHANNEL_SPACES)."""
        return {"qkv_in": self.qkv, "proj_in": self.proj, "fc1_in": self.fc1, "hidden": self.fc2}[space]


# The prunable channel spaces of a block, named like the SlimPlan fields that select in them:
# LayerNorm-1 output (read by qkv), attention values (read by proj), LayerNorm-2 output (read by
# fc1), MLP hidden units (read by fc2).
CHANNEL_SPACES = ("qkv_in", "proj_in", "fc1_in", "hidden")


def blocks_of(model: nn.Module) -> nn.Sequential:
    return model.blocks


def block_parts(block: nn.Module) -> BlockParts:
    attn, mlp = block.attn, block.mlp
    return BlockParts(
        norm1=block.norm1,
        attn=attn,
        qkv=attn.qkv,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        attn_probs=attn.attn_drop,
        proj=attn.proj,
        ls1=block.ls1,
        norm2=block.norm2,
        mlp=mlp,
        fc1=mlp.fc1,
        fc2=mlp.fc2,
        ls2=block.ls2,
    )


def set_fused_attention(block: nn.Module, enabled: bool) -> bool:
    """Switch timm's fused (SDPA) attention path on or off; return the previous setting.

    The unfused path materialises the attention probabilities, which the masked reference needs
    to replace them with a static matrix.
    """
    previous = bool(block.attn.fused_attn)
    block.attn.fused_attn = enabled
    return previous


def replace_blocks(model: nn.Module, new_blocks: list[nn.Module]) -> None:
    """Swap the model's blocks in place, keeping timm's own forward around them."""
    model.blocks = nn.Sequential(*new_blocks)


def check_supported(model: nn.Module) -> None:
    """Raise PruningError naming the first part of `model` that vitslim cannot slim."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise PruningError(f"model class {name} is not a timm VisionTransformer: pick a ViT/DeiT model")
    if getattr(model, "dynamic_img_size", False):
        raise PruningError("dynamic_img_size=True is not supported: exported graphs have a fixed image size")
    if model.global_pool not in _SUPPORTED_POOLS:
        raise PruningError(f"global_pool={model.global_pool!r} is not supported: use one of {_SUPPORTED_POOLS}")
    for index, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise PruningError(f"block {index} is a {type(block).__name__}: only timm's pre-norm Block is supported")
        if not isinstance(block.attn, Attention) or getattr(block.attn, "gate", None) is not None:
            raise PruningError(f"block {index}: attention {type(block.attn).__name__} is not plain timm Attention")
        if not isinstance(block.attn.norm, nn.Identity):
            raise PruningError(f"block {index}: attention output norm (scale_attn_norm) is not supported")
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
            raise PruningError(f"block {index}: MLP {type(block.mlp).__name__} is not plain timm Mlp without norm")


def _head_macs(model: nn.Module) -> int:
    linears = [m for name in ("head", "head_dist") for m in [getattr(model, name, None)] if isinstance(m, nn.Linear)]
    return sum(m.in_features * m.out_features for m in linears)


def geometry_of(model: nn.Module) -> ViTGeometry:
    """Read the geometry of a supported timm ViT (call check_supported first)."""
    first = block_parts(model.blocks[0])
    conv = model.patch_embed.proj
    kernel_macs = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
    num_patches = model.patch_embed.num_patches
    return ViTGeometry(
        depth=len(model.blocks),
        dim=model.embed_dim,
        num_heads=first.attn.num_heads,
        head_dim=first.attn.head_dim,
        mlp_hidden=first.fc1.out_features,
        num_prefix_tokens=model.num_prefix_tokens,
        num_patches=num_patches,
        patch_embed_macs=num_patches * kernel_macs * conv.out_channels,
        head_macs=_head_macs(model),
        pools_patch_tokens=model.global_pool in _PATCH_POOLS,
    )


def supported_geometry(model: nn.Module) -> ViTGeometry:
    """The geometry of `model`, after checking that vitslim can slim it."""
    check_supported(model)
    return geometry_of(model)


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model takes."""
    conv = model.patch_embed.proj
    height, width = model.patch_embed.img_size
    return conv.in_channels, height, width


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the patch grid; patch token p (after the prefix) sits at divmod(p, columns)."""
    rows, columns = model.patch_embed.grid_size
    return int(rows), int(columns)


def count_params(model: nn.Module) -> int:
    """Parameters, constant matrices of a compact module included (they are parameters there)."""
    return sum(p.numel() for p in model.parameters())
