"""The ONNX Attention op -> onnxruntime's com.microsoft.MultiHeadAttention (the "ort-mha" form).

The exporter writes each block's attention as Reshape [B, N, H, D] -> Transpose (0, 2, 1, 3) on
q, k and v, the Attention op, and Transpose -> Reshape [B, N, H * Dv] on its output.
MultiHeadAttention takes and gives the [B, N, H * D] tensors directly, so the pass drops the
head split and merge around it; keys/values may be longer than queries (rectangular attention)
and value heads narrower than query heads (VTP). Attention nodes that do not have this shape (a
mask, causal, q/k norms between the split and the op) are left as they are and counted in the log.
"""

from __future__ import annotations

import logging

import numpy as np

from .registry import register_pass

log = logging.getLogger(__name__)
HEAD_SPLIT_PERM = [0, 2, 1, 3]


def _producer(tensor, op: str):
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return node if node is not None and node.op == op else None


def _head_split_source(tensor):
    """(x [B, N, H*D], [?, N, H, D]) when `tensor` is Transpose(0,2,1,3) of Reshape(x, [?, N, H, D]), else None."""
    import onnx_graphsurgeon as gs

    transpose = _producer(tensor, "Transpose")
    if transpose is None or list(transpose.attrs.get("perm", [])) != HEAD_SPLIT_PERM:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or not isinstance(reshape.inputs[1], gs.Constant):
        return None
    shape = [int(d) for d in np.asarray(reshape.inputs[1].values).tolist()]
    return (reshape.inputs[0], shape) if len(shape) == 4 and min(shape[1:]) > 0 else None


def _head_merge_target(tensor, merged_shape: list[int]):
    """The Reshape when `tensor` only feeds Transpose(0,2,1,3) -> Reshape to [?, N, H*Dv] (`merged_shape` [N, H*Dv])."""
    import onnx_graphsurgeon as gs

    if (
        len(tensor.outputs) != 1
        or tensor.outputs[0].op != "Transpose"
        or list(tensor.outputs[0].attrs.get("perm", [])) != HEAD_SPLIT_PERM
    ):
        return None
    merged = tensor.outputs[0].outputs[0]
    if len(merged.outputs) != 1 or merged.outputs[0].op != "Reshape":
        return None
    reshape = merged.outputs[0]
    if not isinstance(reshape.inputs[1], gs.Constant):
        return None
    shape = [int(d) for d in np.asarray(reshape.inputs[1].values).tolist()]
    return reshape if len(shape) == 3 and shape[1:] == merged_shape else None


def _plain(node) -> bool:
    attrs = node.attrs
    return (
        len(node.inputs) == 3
        and len([o for o in node.outputs if o.outputs]) == 1
        and not attrs.get("is_causal", 0)
        and not attrs.get("softcap", 0.0)
        and not attrs.get("qk_matmul_output_mode", 0)
    )


@register_pass("ort_multihead_attention")
def ort_multihead_attention(graph):
    import onnx_graphsurgeon as gs

    replaced = kept = 0
    for node in [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]:
        sources = [_head_split_source(t) for t in node.inputs[:3]]
        if not _plain(node) or None in sources or len({split[2] for _, split in sources}) != 1:
            kept += 1
            continue
        (_, q_split), (_, v_split) = sources[0], sources[2]
        target = _head_merge_target(node.outputs[0], [q_split[1], q_split[2] * v_split[3]])  # [N_q, H * Dv]
        if target is None:
            kept += 1
            continue
        heads = q_split[2]
        attrs = {"num_heads": heads}
        if "scale" in node.attrs:
            attrs["scale"] = float(node.attrs["scale"])
        output = target.outputs[0]
        target.outputs.clear()
        node.outputs.clear()
        graph.nodes.append(
            gs.Node(
                "MultiHeadAttention",
                name=f"{node.name}_mha",
                domain="com.microsoft",
                attrs=attrs,
                inputs=[source for source, _ in sources],
                outputs=[output],
            )
        )
        replaced += 1
    if replaced:
        log.info("ort_multihead_attention: %d Attention -> MultiHeadAttention, %d left as they were", replaced, kept)
    return graph.cleanup().toposort()
