"""What travels inside an exported ONNX (its metadata_props) and from there into engine
manifests, and the readers of its input and output shapes: a leaf module, so export/ (which
writes it) and deploy/ (which reads it) share the keys without importing each other."""

from __future__ import annotations

import json
from typing import Optional

PREPROCESSING_KEY = "vitslim.preprocessing"  # JSON of pruning.data.preprocessing(): how images become the input
ATTENTION_FORM_KEY = "vitslim.attention_form"  # the name of export.attention_form's form the graph was written in
QUANTIZATION_KEY = "vitslim.quantization"  # how an INT8 graph was quantized (export.quantize)


def write_metadata(model, entries: dict[str, str]) -> None:
    """Add `entries` (key -> text) to an onnx.ModelProto's metadata_props: the one writer of them."""
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _metadata(model, key: str) -> Optional[str]:
    return next((entry.value for entry in model.metadata_props if entry.key == key), None)


def attention_form_of(model) -> Optional[str]:
    """The attention form recorded in an onnx.ModelProto, or None (not exported by vitslim)."""
    return _metadata(model, ATTENTION_FORM_KEY)


def preprocessing_of(model) -> Optional[dict]:
    """The preprocessing recorded in an onnx.ModelProto, or None (an ONNX not exported by vitslim,
    or exported without knowing its data)."""
    text = _metadata(model, PREPROCESSING_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def tensor_dims(value_info) -> list:
    """The dimensions of a graph input or output: numbers, symbolic ones by their names."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def image_shape_of(model) -> tuple[int, ...]:
    """The per-image input shape (C, H, W) of an onnx.ModelProto (the batch dimension dropped)."""
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def class_count_of(model) -> int:
    """The number of logits per image of an onnx.ModelProto's first output."""
    return model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
