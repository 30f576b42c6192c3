"""What travels inside an exported ONNX (its metadata_props) and from there into engine
manifests: a leaf module, so export/ (which writes it) and deploy/ (which reads it) share the
keys without importing each other."""
from __future__ import annotations

import json
from typing import Optional

PREPROCESSING_KEY = "vitslim.preprocessing"  # JSON of pruning.data.preprocessing(): how images become the input


def preprocessing_of(model) -> Optional[dict]:
    """The preprocessing recorded in an onnx.ModelProto, or None (an ONNX not exported by vitslim,
    or exported without knowing its data)."""
    for entry in model.metadata_props:
        if entry.key == PREPROCESSING_KEY:
            try:
                return json.loads(entry.value)
            except ValueError:
                return None
    return None
