"""deploy/cuda_graph.py's CUDA runtime calls on a real GPU (no TensorRT needed: the captured work
is a device-to-device copy): a captured graph replays what was enqueued, reading the buffers'
contents at replay time; a failed or invalidated capture is a one-line error that leaves the
stream usable; CUDA events time a replay. The TensorRT enqueue inside the capture is what
`vitslim selftest` checks on a TensorRT machine (replayed output against the reference)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from vitslim.deploy.cuda_graph import CapturedGraph, CudaRuntime, EventTimer
from vitslim.deploy.errors import DeployError

pytestmark = pytest.mark.gpu

DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


@pytest.fixture
def cuda():
    from polygraphy import cuda

    stream = cuda.Stream()
    source, target = (
        cuda.DeviceArray(shape=(1 << 20,), dtype=np.float32),
        cuda.DeviceArray(shape=(1 << 20,), dtype=np.float32),
    )
    yield cuda, CudaRuntime.from_polygraphy(cuda), stream, source, target
    for array in (source, target):
        array.free()
    stream.free()


def copy_on(runtime, stream, source, target):
    def enqueue() -> bool:
        runtime.call(
            "cudaMemcpyAsync",
            ctypes.c_void_p(target.ptr),
            ctypes.c_void_p(source.ptr),
            ctypes.c_size_t(source.nbytes),
            ctypes.c_int(DEVICE_TO_DEVICE),
            ctypes.c_void_p(stream.ptr),
        )
        return True

    return enqueue


def test_a_captured_graph_replays_with_the_buffers_contents_at_replay_time(cuda):
    _, runtime, stream, source, target = cuda
    target.copy_from(np.zeros(1 << 20, dtype=np.float32), stream)
    source.copy_from(np.arange(1 << 20, dtype=np.float32), stream)
    stream.synchronize()
    graph = CapturedGraph(runtime, stream.ptr, copy_on(runtime, stream, source, target), "a copy")
    try:
        stream.synchronize()
        assert not target.numpy().any()  # captured, not run
        source.copy_from(np.full(1 << 20, 7.0, dtype=np.float32), stream)
        graph.launch()
        stream.synchronize()
        assert (target.numpy() == 7.0).all()
        timer = EventTimer(runtime, stream.ptr)
        try:
            times = [timer.time_ms(graph.launch) for _ in range(20)]
        finally:
            timer.free()
        assert all(0.0 < t < 100.0 for t in times)  # 4 MiB copied in microseconds, not a host timer's noise
    finally:
        graph.free()


def test_failed_and_invalidated_captures_are_one_line_errors_that_leave_the_stream_usable(cuda):
    _, runtime, stream, source, target = cuda
    with pytest.raises(
        DeployError,
        match=r"^a copy cannot be captured in a CUDA graph \(it could not be enqueued during stream capture\)",
    ):
        CapturedGraph(runtime, stream.ptr, lambda: False, "a copy")

    def synchronous_copy() -> bool:  # not allowed while a thread-local capture is under way: it invalidates the capture
        runtime.library.cudaMemcpy(
            ctypes.c_void_p(target.ptr),
            ctypes.c_void_p(source.ptr),
            ctypes.c_size_t(source.nbytes),
            ctypes.c_int(DEVICE_TO_DEVICE),
        )
        return True

    with pytest.raises(DeployError, match=r"cannot be captured in a CUDA graph \(cudaErrorStreamCapture"):
        CapturedGraph(runtime, stream.ptr, synchronous_copy, "a copy")
    runtime.library.cudaGetLastError()  # the refused call's sticky-free error
    source.copy_from(np.full(1 << 20, 3.0, dtype=np.float32), stream)
    copy_on(runtime, stream, source, target)()
    stream.synchronize()
    assert (target.numpy() == 3.0).all()
