"""ToMe, the training-free peer (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023),
written here from the paper for evaluation only: it is not part of vitslim.

Per block, on timm's own submodules and weights:

1. attention over the current tokens with *proportional attention*: the log of each key's size
   (how many original patches it stands for) is added to the attention logits;
2. *bipartite soft matching* on the keys (averaged over heads): the patch tokens alternate into
   sets A and B, each A token's most cosine-similar B token is its edge, the r best edges merge
   their A token into the B token; prefix tokens (class, distillation) never merge;
3. merged tokens are *size-weighted averages*, sizes add;
4. the MLP then runs on the merged (r fewer) tokens.

The token count after every block is fixed by the schedule (r per block), so all shapes are
static; the indices are data-dependent (TopK / GatherElements / ScatterElements in ONNX).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from vitslim.pruning.macs import block_macs
from vitslim.pruning.plan import BlockPlan, TokenCounts
from vitslim.pruning.timm_adapter import ViTGeometry, block_parts, supported_geometry

ATTENTION_PARTS = ("qk_proj", "qk_scores", "v_proj", "attn_v", "proj")  # block_macs keys at the pre-merge count
MLP_PARTS = ("fc1", "fc2")  # at the merged count


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, num_prefix: int, scatter: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r patch tokens of x [B, N, C] (sizes [B, N, 1], keys [B, N, D]) into their best
    partners by bipartite soft matching; returns [B, N - r, C] and the new sizes. `scatter`
    adds sources into destinations with scatter_add (ONNX ScatterElements, reduction add);
    otherwise with a one-hot matrix product (the same sums; ONNX Equal + MatMul)."""
    if r <= 0:
        return x, size
    prefix_x, prefix_size = x[:, :num_prefix], size[:, :num_prefix]
    x, size, keys = x[:, num_prefix:], size[:, num_prefix:], keys[:, num_prefix:]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    similarity = keys[:, ::2] @ keys[:, 1::2].transpose(-1, -2)  # A x B
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    destination = partner.gather(1, merged)

    def combine(values: torch.Tensor) -> torch.Tensor:
        width = values.shape[-1]
        set_a, set_b = values[:, ::2], values[:, 1::2]
        sources = set_a.gather(1, merged[..., None].expand(-1, -1, width))
        if scatter:
            set_b = set_b.scatter_add(1, destination[..., None].expand(-1, -1, width), sources)
        else:
            slots = torch.arange(set_b.shape[1], device=values.device)
            assignment = (destination[..., None] == slots).to(values.dtype)  # [B, r, |B|]
            set_b = set_b + assignment.transpose(1, 2) @ sources
        return torch.cat([set_a.gather(1, unmerged[..., None].expand(-1, -1, width)), set_b], dim=1)

    weighted, new_size = combine(x * size), combine(size)
    return torch.cat([prefix_x, weighted / new_size], dim=1), torch.cat([prefix_size, new_size], dim=1)


def proportional_attention(block: nn.Module, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention of `block` on x [B, N, C] (already normed) with log(size) added to the
    logits; returns the projected output and the keys averaged over heads [B, N, head_dim]."""
    parts = block_parts(block)
    batch, tokens, _ = x.shape
    heads = parts.attn.num_heads
    q, k, v = parts.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = parts.q_norm(q), parts.k_norm(k)
    bias = size.log().transpose(1, 2)[:, None].to(q.dtype)  # [B, 1, 1, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.attn.scale)
    return parts.proj(out.transpose(1, 2).reshape(batch, tokens, -1)), k.mean(dim=1)


class ToMe(nn.Module):
    """timm ViT `model` (shared, not copied) with `schedule[b]` tokens merged in block b
    (`scatter`: how merged tokens are summed, see merge_tokens)."""

    def __init__(self, model: nn.Module, schedule: Sequence[int], scatter: bool = True) -> None:
        super().__init__()
        geometry = supported_geometry(model)
        check_schedule(schedule, geometry)
        self.model, self.schedule, self.num_prefix, self.scatter = (
            model.eval(),
            tuple(schedule),
            geometry.num_prefix_tokens,
            scatter,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        size = torch.ones_like(x[..., :1])
        for block, r in zip(model.blocks, self.schedule):
            parts = block_parts(block)
            attended, keys = proportional_attention(block, parts.norm1(x), size)
            x = x + parts.ls1(attended)
            x, size = merge_tokens(x, size, keys, r, self.num_prefix, self.scatter)
            x = x + parts.ls2(parts.mlp(parts.norm2(x)))
        return model.forward_head(model.norm(x))


def token_counts(schedule: Sequence[int], geometry: ViTGeometry) -> list[int]:
    """Tokens entering each block."""
    counts = [geometry.num_tokens]
    for r in schedule[:-1]:
        counts.append(counts[-1] - r)
    return counts


def check_schedule(schedule: Sequence[int], geometry: ViTGeometry) -> None:
    if len(schedule) != geometry.depth:
        raise ValueError(f"ToMe schedule has {len(schedule)} entries for {geometry.depth} blocks")
    for block, (tokens, r) in enumerate(zip(token_counts(schedule, geometry), schedule)):
        set_a = (tokens - geometry.num_prefix_tokens + 1) // 2
        if not 0 <= r <= set_a:
            raise ValueError(f"ToMe block {block}: r={r} must be in [0, {set_a}] (the size of set A)")


def tome_macs(schedule: Sequence[int], geometry: ViTGeometry) -> int:
    """MACs of ToMe for one image, counted like vitslim.pruning.macs: attention at the block's
    token count, the MLP at the merged count, plus the matching (A x B cosine on head_dim keys)."""
    check_schedule(schedule, geometry)
    dense = BlockPlan()
    total = geometry.patch_embed_macs + geometry.head_macs
    for tokens, r in zip(token_counts(schedule, geometry), schedule):
        before, after = TokenCounts(tokens, tokens, tokens), TokenCounts(tokens - r, tokens - r, tokens - r)
        attention, mlp = block_macs(dense, geometry, before), block_macs(dense, geometry, after)
        patches = tokens - geometry.num_prefix_tokens
        matching = ((patches + 1) // 2) * (patches // 2) * geometry.head_dim if r else 0
        total += sum(attention[p] for p in ATTENTION_PARTS) + sum(mlp[p] for p in MLP_PARTS) + matching
    return total


def schedule_for_macs(target_macs: int, geometry: ViTGeometry) -> tuple[int, ...]:
    """The ToMe schedule closest to `target_macs`: a constant r (the paper's form), with r + 1 in
    the first k blocks where that lands closer. Each r is capped at the size of set A."""

    def capped(schedule: list[int]) -> tuple[int, ...]:
        out, tokens = [], geometry.num_tokens
        for r in schedule:
            r = min(r, (tokens - geometry.num_prefix_tokens + 1) // 2)
            out.append(r)
            tokens -= r
        return tuple(out)

    candidates = []
    for r in range(geometry.num_patches):
        for extra in range(geometry.depth):
            schedule = capped([r + 1] * extra + [r] * (geometry.depth - extra))
            candidates.append((abs(tome_macs(schedule, geometry) - target_macs), schedule))
        if tome_macs(capped([r] * geometry.depth), geometry) < target_macs:
            break
    return min(candidates)[1]


# ops whose indices depend on the data (the matching): what a static-graph question is about
DATA_DEPENDENT_OPS = (
    "TopK",
    "ArgMax",
    "GatherElements",
    "ScatterElements",
    "ScatterND",
    "GatherND",
    "NonZero",
    "Unique",
)


def export_tome(model: nn.Module, schedule: Sequence[int], path, scatter: bool = True) -> dict:
    """Try to export ToMe to ONNX (dynamic batch, everything else static) and check it in
    onnxruntime against PyTorch; returns sizes, the data-dependent ops and parity, or the error."""
    from collections import Counter

    from vitslim.export.attention_form import attention_form
    from vitslim.export.onnx_export import onnx_from_module, run_onnxruntime
    from vitslim.pruning.timm_adapter import count_params

    from vitslim.core.files import atomic_path
    from vitslim.core.precision import compare_outputs

    module = ToMe(model.float().cpu().eval(), schedule, scatter).eval()
    images = torch.randn(4, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    try:
        with atomic_path(path) as tmp:
            exported = onnx_from_module(
                module, images, tmp, attention_form("matmul-softmax").opset
            )  # ToMe's own attention: explicit ops
            with torch.no_grad():
                parity = compare_outputs(module(images).numpy(), run_onnxruntime(tmp, images.numpy()))
            size = tmp.stat().st_size
    except Exception as error:  # the question is whether it exports at all: record any failure
        return {
            "params": count_params(model),
            "onnx_error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        }
    ops = Counter(node.op_type for node in exported.graph.node)
    # the exporter records every intermediate shape (onnx's own inference loses them at Reshapes)
    batch = exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    dynamic = sorted(
        {
            v.name
            for v in exported.graph.value_info
            for d in v.type.tensor_type.shape.dim
            if d.dim_param and d.dim_param != batch
        }
    )
    return {
        "params": count_params(model),
        "onnx_bytes": size,
        "parity": parity.to_dict(),
        "data_dependent_ops": {op: ops[op] for op in DATA_DEPENDENT_OPS if ops[op]},
        "shapes_recorded": len(exported.graph.value_info),
        "tensors_with_dynamic_dims_besides_batch": len(dynamic),
        "onnx_file": path.name,
    }
