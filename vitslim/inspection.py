"""`vitslim inspect ARTIFACT`: what an ONNX file, an engine or a run directory is, in one screen:
inputs and outputs, precision, preprocessing, batch profiles, build options, and for an engine on
a GPU the per-layer information of TensorRT's engine inspector."""

from __future__ import annotations

from pathlib import Path

from .artifacts import open_artifact


def describe(path: str | Path, layers: bool = True) -> dict:
    """What `path` is (an ONNX file, an engine or a run directory), as a dict (see vitslim.artifacts)."""
    return open_artifact(path).describe(layers)


def to_text(description: dict) -> str:
    """The description as indented 'key: value' lines (lists of names shortened)."""
    lines = []

    def walk(value, indent: int, key: str) -> None:
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for inner_key, inner in value.items():
                walk(inner, indent + 1, inner_key)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for item in value:
                lines.append(f"{pad}  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        elif isinstance(value, list) and len(value) > 12:
            lines.append(f"{pad}{key}: {value[:12]} ... ({len(value)} in all)")
        else:
            lines.append(f"{pad}{key}: {value}")

    for key, value in description.items():
        walk(value, 0, key)
    return "\n".join(lines)
