"""The onnxruntime runner: an ONNX file on the CPU provider or the CUDA provider (onnxruntime-gpu)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.core.files import sha256_of

from ..errors import DeployError
from .base import Runner


def numpy_dtype_of(ort_type: str):
    """numpy's dtype for an onnxruntime IO type ('tensor(float16)' -> float16; fp32 otherwise)."""
    return np.float16 if "float16" in ort_type else np.float32


@dataclass
class OrtBinding:
    """A batch bound to device memory for onnxruntime: its input and output OrtValues, the IO
    binding and the run options (each batch shape is its own CUDA graph, by gpu_graph_id)."""

    images: object  # OrtValue on the GPU
    output: object  # OrtValue on the GPU
    binding: object  # onnxruntime.IOBinding
    run_options: object  # onnxruntime.RunOptions


class OnnxRuntimeRunner(Runner):
    """An ONNX file in onnxruntime: the CPU provider, or the CUDA provider (onnxruntime-gpu).

    On CUDA, inputs and outputs live in device memory bound once per batch shape (no host copies in
    what is timed), the graph's own input dtype is used (fp16 graphs take fp16 if their input is),
    onnxruntime computes on a stream of ours so that CUDA events time the GPU work, and with
    `cuda_graph` (onnxruntime's enable_cuda_graph) each batch shape is captured once and replayed,
    as the PyTorch and TensorRT runners are. fp32 is IEEE fp32 (TF32 off)."""

    backend = "onnxruntime"

    def __init__(
        self, onnx_path: str | Path, device: str = "cpu", threads: Optional[int] = None, cuda_graph: bool = False
    ) -> None:
        if cuda_graph and not device.startswith("cuda"):
            raise DeployError("CUDA graphs need --device cuda")
        if device.startswith("cuda") and device not in ("cuda", "cuda:0"):
            raise DeployError(
                f"the onnxruntime runner uses the first visible GPU: pick it with CUDA_VISIBLE_DEVICES and pass --device cuda, not {device}"
            )
        self.onnx_path, self.device, self.threads, self.cuda_graph = Path(onnx_path), device, threads, cuda_graph
        self.session = self._timer = self._stream = None
        self._bound: dict[tuple, OrtBinding] = {}
        self.setup_seconds: dict[str, float] = {}

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = ["CPUExecutionProvider"]
        try:
            if self.on_cuda:
                providers = [("CUDAExecutionProvider", self._cuda_options(ort)), "CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except DeployError:
            self.deactivate_impl()  # the stream and events made for it
            raise
        except Exception as error:  # onnxruntime raises its own types (e.g. a graph that CUDA graphs cannot hold)
            self.deactivate_impl()
            hint = ": time it with --no-cuda-graph" if self.cuda_graph else ""
            raise DeployError(
                f"onnxruntime cannot load {self.onnx_path.name} ({type(error).__name__}: {str(error).splitlines()[0][:300]}){hint}"
            ) from None
        if self.on_cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            self.deactivate_impl()
            raise DeployError(
                f"onnxruntime could not start its CUDA provider for {self.onnx_path.name} (its log above says why): check the GPU "
                f"and onnxruntime-gpu's CUDA libraries"
            )
        graph_input = self.session.get_inputs()[0]
        self.input_name, self.output_name = graph_input.name, self.session.get_outputs()[0].name
        self.input_dtype = numpy_dtype_of(graph_input.type)

    def _cuda_options(self, ort) -> dict:
        from ..cuda_graph import CudaRuntime, EventTimer

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeployError(
                "onnxruntime here has no CUDAExecutionProvider: use --device cpu or install onnxruntime-gpu"
            )
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21 finds pip's CUDA/cuDNN libraries so
            ort.preload_dlls()
        self.cudart = CudaRuntime.loaded()
        self._stream = self.cudart.new_stream()
        self._timer = EventTimer(self.cudart, self._stream)
        return {
            "device_id": 0,
            "use_tf32": 0,
            "user_compute_stream": str(self._stream),
            "enable_cuda_graph": int(self.cuda_graph),
        }

    def deactivate_impl(self) -> None:
        self._bound = {}
        self.session = None
        if self._timer is not None:
            self._timer.free()
            self.cudart.destroy_stream(self._stream)
        self._timer = self._stream = None

    def infer_impl(self, images: np.ndarray) -> np.ndarray:
        if not self.on_cuda:
            return self.session.run(None, {self.input_name: images.astype(self.input_dtype)})[0].astype(np.float32)
        bound = self.prepare_impl(images)
        self.run_prepared_impl(bound)
        return bound.output.numpy().astype(np.float32)

    def prepare_impl(self, images: np.ndarray):
        """CPU: the images in the graph's input dtype. CUDA: the batch copied into the device input
        of its shape (bound once per shape, with its output; captured with `cuda_graph`, the capture
        timed in setup_seconds)."""
        host = np.ascontiguousarray(images, dtype=self.input_dtype)
        if not self.on_cuda:
            return host
        bound = self._bound.get(host.shape)
        if bound is not None:
            bound.images.update_inplace(host)  # same device address: a captured graph reads it
            return bound
        started = time.perf_counter()
        bound = self._bind(host)
        for _ in range(3 if self.cuda_graph else 1):  # onnxruntime captures on a run after the first
            self.run_prepared_impl(bound)
        self._bound[host.shape] = bound
        self.setup_seconds[str(host.shape)] = time.perf_counter() - started
        return bound

    def _bind(self, host: np.ndarray) -> OrtBinding:
        import onnxruntime as ort

        device_id = 0  # the first visible GPU (see __init__)
        images = ort.OrtValue.ortvalue_from_numpy(host, "cuda", device_id)
        output_meta = self.session.get_outputs()[0]
        output_dtype = numpy_dtype_of(output_meta.type)
        output_shape = [len(host)] + [int(d) for d in output_meta.shape[1:]]
        output = ort.OrtValue.ortvalue_from_shape_and_type(output_shape, output_dtype, "cuda", device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, images)
        binding.bind_ortvalue_output(self.output_name, output)
        run_options = ort.RunOptions()
        if self.cuda_graph:  # one captured graph per batch shape (ids > 0; 0 is onnxruntime's default)
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
        return OrtBinding(images=images, output=output, binding=binding, run_options=run_options)

    def run_prepared_impl(self, prepared) -> None:
        if not self.on_cuda:
            self.infer_impl(prepared)
            return
        self.session.run_with_iobinding(prepared.binding, prepared.run_options)

    def synchronize(self) -> None:
        if self._stream is not None:
            self.cudart.synchronize_stream(self._stream)

    def time_ms(self, prepared) -> float:
        """One run_prepared between two CUDA events on onnxruntime's compute stream (CUDA only)."""
        self.require_active()
        if self._timer is None:
            raise DeployError("the onnxruntime runner times GPU work with CUDA events: activate it with --device cuda")
        return self._timer.time_ms(lambda: self.run_prepared_impl(prepared))

    @property
    def description(self) -> dict:
        import onnxruntime as ort

        from ..gpu import gpu_info

        description = {
            "backend": self.backend,
            "device": self.device,
            "onnxruntime": ort.__version__,
            "onnx_sha256": sha256_of(self.onnx_path),
        }
        if self.on_cuda:
            description.update(provider="CUDAExecutionProvider", cuda_graph=self.cuda_graph, gpu=gpu_info())
        return description
