"""Which TensorRT is installed: full TensorRT (`tensorrt`, 10 or 11) or TensorRT-RTX
(`tensorrt_rtx`). Imported lazily so that everything else works where neither is present."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

from .errors import DeployError

LIBRARIES = ("tensorrt", "tensorrt_rtx")


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def has_attention_layer(self) -> bool:
        """Whether this library parses the ONNX Attention op into an attention layer (TensorRT 10.14+, TensorRT-RTX)."""
        return hasattr(self.module.LayerType, "ATTENTION_INPUT")

    def logger(self):
        return self.module.Logger(self.module.Logger.WARNING)


def find_tensorrt(preferred: Optional[str] = None) -> Optional[TensorRT]:
    """The first importable library of `preferred` or LIBRARIES, or None."""
    for name in [preferred] if preferred else LIBRARIES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return TensorRT(module=module, name=name, version=module.__version__)
    return None


def require_tensorrt(preferred: Optional[str] = None) -> TensorRT:
    found = find_tensorrt(preferred)
    if found is None:
        wanted = preferred or " or ".join(LIBRARIES)
        raise DeployError(
            f"{wanted} is not installed: pip install tensorrt-rtx (RTX GPUs), or use docker/Dockerfile (NVIDIA's TensorRT image)"
        )
    return found
