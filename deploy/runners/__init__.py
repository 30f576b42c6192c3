"""Runners: one interface over PyTorch modules, onnxruntime sessions and TensorRT engines.

Loaders build (export/, deploy.build); runners only run. Each backend is a module of its own
behind one base class (`base.Runner`, Polygraphy's runner shape: activate/deactivate with an
active-state guard, `infer` on numpy arrays, `prepare`/`run_prepared` on device-resident inputs
for timing, and a `description` for fingerprints). torch, onnxruntime and TensorRT are imported
only by the runner that uses them.
"""

from .base import Runner
from .onnxruntime_runner import OnnxRuntimeRunner, numpy_dtype_of
from .tensorrt_runner import RUNTIME_CACHE_SUFFIX, TensorRTRunner, runtime_cache_path
from .torch_runner import TORCH_DTYPES, TORCH_MODES, TorchRunner

__all__ = [
    "Runner",
    "TorchRunner",
    "OnnxRuntimeRunner",
    "TensorRTRunner",
    "TORCH_MODES",
    "TORCH_DTYPES",
    "RUNTIME_CACHE_SUFFIX",
    "numpy_dtype_of",
    "runtime_cache_path",
]
