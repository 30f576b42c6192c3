"""CUDA graphs, streams and CUDA-event timing, through the CUDA runtime library that Polygraphy
or onnxruntime-gpu has already loaded (ctypes; no torch, no cuda-python).

Why graphs: a TensorRT enqueue launches one kernel per fused layer from the host, so a benchmark
of a sub-millisecond engine that enqueues in every iteration partly times the host. trtexec
--useCudaGraph captures the enqueue once and replays the graph; the PyTorch runners' cuda_graph
mode does the same, so TensorRT and PyTorch latencies measured this way are comparable.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from .errors import DeployError

# cudaStreamCaptureModeThreadLocal: other threads may keep calling unsafe CUDA APIs during capture
# (TensorRT's own samples capture in this mode).
CAPTURE_MODE_THREAD_LOCAL = 1
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


class CudaRuntime:
    """The CUDA runtime calls vitslim makes beyond Polygraphy's wrapper, each checked: a failure is
    a one-line DeployError naming the call and CUDA's error name."""

    def __init__(self, library) -> None:
        """`library`: the loaded libcudart (polygraphy.cuda.wrapper().handle)."""
        self.library = library
        self.library.cudaGetErrorName.restype = ctypes.c_char_p

    @classmethod
    def from_polygraphy(cls, cuda) -> "CudaRuntime":
        return cls(cuda.wrapper().handle)

    @classmethod
    def loaded(cls) -> "CudaRuntime":
        """The CUDA runtime library this process has loaded (onnxruntime-gpu's preload_dlls or torch
        load it), else the first one the loader finds: ctypes returns the loaded copy by its soname."""
        for name in CUDART_NAMES:
            try:
                return cls(ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL))
            except OSError:
                continue
        raise DeployError(
            f"no CUDA runtime library ({', '.join(CUDART_NAMES)}) can be loaded: install the CUDA runtime "
            f"(pip install nvidia-cuda-runtime) or put it on LD_LIBRARY_PATH"
        )

    def new_stream(self) -> int:
        """A non-blocking CUDA stream (cudaStream_t as int); destroy it with destroy_stream."""
        stream = ctypes.c_void_p()
        self.call("cudaStreamCreateWithFlags", ctypes.byref(stream), ctypes.c_uint(1))  # cudaStreamNonBlocking
        return int(stream.value)

    def synchronize_stream(self, stream: int) -> None:
        self.call("cudaStreamSynchronize", ctypes.c_void_p(stream))

    def destroy_stream(self, stream: int) -> None:
        self.library.cudaStreamDestroy(ctypes.c_void_p(stream))

    def error_name(self, status: int) -> str:
        name = self.library.cudaGetErrorName(ctypes.c_int(status))
        return name.decode() if name else f"error {status}"

    def call(self, function: str, *arguments) -> None:
        status = getattr(self.library, function)(*arguments)
        if status != 0:
            raise DeployError(
                f"CUDA runtime call {function} failed with {self.error_name(status)}: check the GPU with nvidia-smi"
            )


class CapturedGraph:
    """What `enqueue()` puts on `stream` (a cudaStream_t as int), captured once into a CUDA graph and
    replayed by `launch()`. `enqueue` returns False when it could not enqueue (TensorRT's
    execute_async_v3 does); the capture is ended in every case, so the stream never stays in
    capture mode."""

    def __init__(self, runtime: CudaRuntime, stream: int, enqueue: Callable[[], bool], what: str = "the work") -> None:
        self.runtime, self.stream = runtime, ctypes.c_void_p(stream)
        self.graph, self.executable = ctypes.c_void_p(), ctypes.c_void_p()
        runtime.call("cudaStreamBeginCapture", self.stream, ctypes.c_int(CAPTURE_MODE_THREAD_LOCAL))
        try:
            enqueued = enqueue()
        finally:
            status = runtime.library.cudaStreamEndCapture(self.stream, ctypes.byref(self.graph))
        if not enqueued or status != 0:
            self.free()
            reason = "it could not be enqueued during stream capture" if not enqueued else runtime.error_name(status)
            raise DeployError(f"{what} cannot be captured in a CUDA graph ({reason}): time it with --no-cuda-graph")
        try:
            # WithFlags: one signature in CUDA 11.4 to 13 (plain cudaGraphInstantiate changed in CUDA 12)
            runtime.call(
                "cudaGraphInstantiateWithFlags", ctypes.byref(self.executable), self.graph, ctypes.c_ulonglong(0)
            )
        except DeployError:
            self.free()
            raise

    def launch(self) -> None:
        self.runtime.call("cudaGraphLaunch", self.executable, self.stream)

    def free(self) -> None:
        if self.executable.value:
            self.runtime.library.cudaGraphExecDestroy(self.executable)
        if self.graph.value:
            self.runtime.library.cudaGraphDestroy(self.graph)
        self.graph, self.executable = ctypes.c_void_p(), ctypes.c_void_p()


class EventTimer:
    """Milliseconds of GPU time between two CUDA events recorded on `stream` around `enqueue()`,
    as torch.cuda.Event times the PyTorch runners. The events are made once and reused."""

    def __init__(self, runtime: CudaRuntime, stream: int) -> None:
        self.runtime, self.stream = runtime, ctypes.c_void_p(stream)
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
        for event in (self.start, self.end):
            runtime.call("cudaEventCreate", ctypes.byref(event))

    def time_ms(self, enqueue: Callable[[], object]) -> float:
        elapsed = ctypes.c_float()
        self.runtime.call("cudaEventRecord", self.start, self.stream)
        enqueue()
        self.runtime.call("cudaEventRecord", self.end, self.stream)
        self.runtime.call("cudaEventSynchronize", self.end)
        self.runtime.call("cudaEventElapsedTime", ctypes.byref(elapsed), self.start, self.end)
        return float(elapsed.value)

    def free(self) -> None:
        for event in (self.start, self.end):
            if event.value:
                self.runtime.library.cudaEventDestroy(event)
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
