"""How dynamic attention is written in an exported ONNX: one registry of forms, read by the
exporter (opset, value-head padding, graph passes), recorded in the report and the ONNX metadata,
and from there in engine manifests and `vitslim inspect`.

The compact module always computes attention with `scaled_dot_product_attention`; the form only
decides what the exporter turns it into. Static attention (DGSSA) is a MatMul by a constant in
every form: it has no scores and no softmax to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ExportError


@dataclass(frozen=True)
class AttentionForm:
    name: str
    opset: int
    pad_value_heads: bool  # VTP's narrower value heads zero-padded to the query head width inside attention
    passes: tuple[str, ...]  # graph passes after the default ones (export/passes)
    runtimes: str  # who runs it
    summary: str


ATTENTION_FORMS = {
    form.name: form
    for form in (
        AttentionForm(
            "attention-op",
            23,
            True,
            (),
            "TensorRT >= 10.14, TensorRT-RTX, onnxruntime",
            # TensorRT's attention layer needs keys and values of one shape, so narrower value heads
            # are zero-padded inside the op and the padding sliced off its output (exact: zero value
            # channels give zero outputs). Measured: TensorRT-RTX 1.7 refuses the op otherwise.
            "the ONNX Attention op (opset 23), one node per block: TensorRT parses it into its fused attention layer, onnxruntime runs its own kernel",
        ),
        AttentionForm(
            "matmul-softmax",
            18,
            False,
            (),
            "any TensorRT (JetPack 6's 10.3 included), onnxruntime",
            "MatMul -> Softmax -> MatMul (opset 18), which older TensorRT fuses itself and newer TensorRT and onnxruntime run unfused",
        ),
        AttentionForm(
            "ort-mha",
            23,
            False,
            ("ort_multihead_attention",),
            "onnxruntime only (a com.microsoft op; TensorRT cannot parse it)",
            "onnxruntime's MultiHeadAttention contrib op (flash / memory-efficient attention on CUDA), from the Attention op by a graph pass",
        ),
    )
}
DEFAULT_ATTENTION_FORM = "attention-op"
TENSORRT_FORMS = (
    "attention-op",
    "matmul-softmax",
)  # what TensorRT parses: the Attention op from 10.14 on, the chain everywhere
NEEDS_ATTENTION_LAYER = "attention-op"  # the form only a TensorRT with an attention layer parses


def attention_form(name: str) -> AttentionForm:
    if name not in ATTENTION_FORMS:
        raise ExportError(f"unknown attention form {name!r}: choose one of {tuple(ATTENTION_FORMS)}")
    return ATTENTION_FORMS[name]
